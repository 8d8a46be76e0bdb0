"""
Tests for caps.client against a real broker in memory (iosim), with time
driven by a fake clock.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from caps.client import CapsError

from .helpers import MemoryNetwork


class _ClientCase(SynchronousTestCase):
    def setUp(self):
        self.net = MemoryNetwork()

    def queue_ids(self, client_id, event):
        queue = self.net.broker.queue(client_id, event)
        return [] if queue is None else [e.message.id for e in queue.entries()]


class ClientTests(_ClientCase):
    def test_publish_confirmed(self):
        """A publish fires with the broker's ok once confirmed."""
        client = self.net.client()
        d = client.publish("delivered", {"orderId": "1"}, to="acme", message_id="d1")
        self.net.flush()
        self.assertEqual(self.successResultOf(d), {"messageId": "d1", "queues": 1})
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])

    def test_publish_refused(self):
        """A publish the broker refuses fails with its error code and is not retried."""
        client = self.net.client()
        d = client.publish("pong", {})
        self.net.flush()
        self.assertEqual(
            self.failureResultOf(d, CapsError).value.code, "reserved-event"
        )
        self.assertTrue(client._is_idle())

    def test_publish_too_long(self):
        """A publish longer than the broker takes fails at once instead of closing the connection again and again."""
        client = self.net.client()
        d = client.publish("delivered", {"blob": "x" * 70_000}, to="acme")
        self.assertEqual(self.failureResultOf(d, CapsError).value.code, "line-too-long")
        self.net.flush()
        self.assertTrue(client.connected)
        self.assertTrue(client._is_idle())

    def test_publish_while_offline(self):
        """A publish made before the connection exists is sent once it does."""
        from caps.client import CapsClient

        client = CapsClient(self.net.endpoint(), self.net.reactor)
        d = client.publish("delivered", {}, to="acme")
        client.start()
        self.assertNoResult(d)
        self.net.complete()
        self.assertEqual(self.successResultOf(d)["queues"], 1)

    def test_resend_after_lost_confirm(self):
        """When the ok is lost with the connection, the publish is re-sent and not duplicated."""
        client = self.net.client()
        d = client.publish("delivered", {"n": 1}, to="acme")
        pump = self.net.pumps[0]
        pump.pump()  # the broker gets the publish and answers ...
        self.net.drop(pump, lose_pending=True)  # ... but the answer is lost
        self.assertNoResult(d)
        self.assertEqual(len(self.queue_ids("acme", "delivered")), 1)
        self.net.advance(10)  # back-off, reconnect, re-send
        result = self.successResultOf(d)
        self.assertTrue(result["duplicate"])
        self.assertEqual(self.queue_ids("acme", "delivered"), [result["messageId"]])

    def test_handler_and_ack(self):
        """Each message is handed to the handler and acknowledged after it returns."""
        client = self.net.client()
        seen = []
        client.subscribe("acme", "delivered", seen.append)
        self.net.flush()
        client.publish("delivered", {"orderId": "1"}, to="acme", message_id="d1")
        self.net.flush()
        self.assertEqual(
            [(d.message_id, d.payload, d.redelivered) for d in seen],
            [("d1", {"orderId": "1"}, False)],
        )
        self.assertEqual(self.queue_ids("acme", "delivered"), [])

    def test_ack_waits_for_handler(self):
        """A handler's Deferred must fire before the message is acknowledged."""
        client = self.net.client()
        pending = defer.Deferred()
        client.subscribe("acme", "delivered", lambda delivery: pending)
        client.publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])
        pending.callback(None)
        self.net.flush()
        self.assertEqual(self.queue_ids("acme", "delivered"), [])

    def test_catch_up_after_reconnect(self):
        """After a reconnect the client catches up on what arrived while it was away."""
        vendor = self.net.client()
        seen = []
        counts = []
        vendor.subscribe(
            "acme",
            "delivered",
            seen.append,
            filter={"store": "acme"},
            on_caught_up=counts.append,
        )
        self.net.flush()
        driver = self.net.client()
        vendor_pump = self.net.pumps[0]
        self.net.drop(vendor_pump)
        for n in range(3):
            driver.publish("delivered", {"store": "acme", "n": n})
        self.net.flush()
        self.assertEqual(seen, [])
        self.net.advance(10)
        self.assertEqual([d.payload["n"] for d in seen], [0, 1, 2])
        self.assertEqual(counts, [0, 3])
        self.assertEqual(self.queue_ids("acme", "delivered"), [])

    def test_handled_once(self):
        """A message redelivered after a lost acknowledgement is acknowledged, not handled again."""
        client = self.net.client()
        seen = []
        client.subscribe("acme", "delivered", seen.append)
        self.net.flush()
        client.publish("delivered", {}, to="acme", message_id="d1")
        pump = self.net.pumps[0]
        pump.pump()  # publish reaches the broker
        pump.pump()  # delivery reaches the client, which acks
        # The ack is lost with the connection.
        pump.clientIO.getOutBuffer()
        self.net.drop(pump)
        self.assertEqual(len(seen), 1)
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])
        self.net.advance(10)
        self.assertEqual(len(seen), 1)
        self.assertEqual(self.queue_ids("acme", "delivered"), [])

    def test_in_progress_not_restarted(self):
        """A message redelivered while its handler still runs is not handed over twice."""
        client = self.net.client()
        calls = []
        pending = defer.Deferred()

        def handler(delivery):
            calls.append(delivery)
            return pending

        client.subscribe("acme", "delivered", handler)
        client.publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.net.drop(self.net.pumps[0])
        self.net.advance(10)
        self.assertEqual(len(calls), 1)
        pending.callback(None)
        self.net.flush()
        self.assertEqual(self.queue_ids("acme", "delivered"), [])

    def test_failing_handler_not_acked(self):
        """A handler that raises leaves its message unacknowledged, and the error is logged."""
        client = self.net.client()

        def handler(delivery):
            raise ValueError("boom")

        client.subscribe("acme", "delivered", handler)
        client.publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])

    def test_unsubscribe(self):
        """After unsubscribe nothing more is handled; the queue keeps collecting."""
        client = self.net.client()
        seen = []
        client.subscribe("acme", "delivered", seen.append)
        self.net.flush()
        client.unsubscribe("acme", "delivered")
        client.publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.assertEqual(seen, [])
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])

    def test_stop_waits_for_confirms(self):
        """stop() waits for unconfirmed publishes, then closes; no timers are left behind."""
        client = self.net.client()
        d = client.publish("delivered", {}, to="acme")
        stopped = client.stop()
        again = client.stop()
        self.assertNoResult(stopped)
        self.net.flush()
        self.successResultOf(d)
        self.net.flush()
        self.successResultOf(stopped)
        self.successResultOf(again)
        self.assertFalse(client.connected)
        self.assertEqual(self.net.reactor.getDelayedCalls(), [])

    def test_stop_gives_up(self):
        """stop() gives up waiting after its time-out when the broker is gone."""
        client = self.net.client()
        self.net.drop(self.net.pumps[0])
        client.publish("delivered", {}, to="acme")
        stopped = client.stop(timeout=2)
        self.net.reactor.advance(1.9)
        self.assertNoResult(stopped)
        self.net.reactor.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(self.net.reactor.getDelayedCalls(), [])

    def test_backoff(self):
        """Failed connection attempts are retried after 0.5 s x 1.5^n plus up to 1 s of jitter."""
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        from caps.client import CapsClient

        client = CapsClient(self.net.endpoint(), self.net.reactor)
        client.start()
        attempts = []
        for _ in range(5):
            self.assertEqual(len(self.net.reactor.tcpClients), 1)
            self.net._completer.failOnce(Failure(ConnectionRefusedError()))
            [delayed] = self.net.reactor.getDelayedCalls()
            attempts.append(delayed.getTime() - self.net.reactor.seconds())
            self.net.reactor.advance(attempts[-1])
        for n, delay in enumerate(attempts, 1):
            base = 0.5 * 1.5**n
            self.assertTrue(base <= delay < base + 1, (n, delay))
        self.net.complete()
        self.assertTrue(client.connected)


class ClientRecoveryTests(_ClientCase):
    """
    What the client does when the broker refuses for now, when handlers
    fail, and while it unsubscribes or stops.
    """

    def test_retries_store_unavailable(self):
        """A publish refused with store-unavailable is kept and tried again until confirmed."""
        client = self.net.client()
        self.net.broker.store.available = False
        d = client.publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.assertNoResult(d)
        self.net.advance(1.0)
        self.assertNoResult(d)
        self.net.broker.store.available = True
        self.net.advance(2.5)
        self.assertEqual(self.successResultOf(d), {"messageId": "d1", "queues": 1})
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])

    def test_retries_subscribe(self):
        """A subscribe refused with store-unavailable is sent again until it holds."""
        client = self.net.client()
        seen = []
        self.net.broker.store.available = False
        client.subscribe("acme", "delivered", seen.append)
        self.net.flush()
        self.assertIsNone(self.net.broker.queue("acme", "delivered"))
        self.net.broker.store.available = True
        self.net.advance(1.5)
        self.net.client().publish("delivered", {}, to="acme")
        self.net.flush()
        self.assertEqual(len(seen), 1)

    def test_window(self):
        """A subscription's prefetch holds back the rest until messages are acknowledged, after a reconnect too."""
        client = self.net.client()
        pending = [defer.Deferred() for _ in range(5)]
        seen = []

        def handler(delivery):
            seen.append(delivery.payload["n"])
            return pending[delivery.payload["n"]]

        client.subscribe("driver", "pickup", handler, prefetch=2)
        publisher = self.net.client()
        for n in range(5):
            publisher.publish("pickup", {"n": n}, to="driver")
        self.net.flush()
        self.assertEqual(seen, [0, 1])
        pending[0].callback(None)
        self.net.flush()
        self.assertEqual(seen, [0, 1, 2])
        self.net.drop(self.net.pumps[0])
        self.net.advance(10)
        # Back with the same window: 1 and 2 are still being handled.
        self.assertEqual(seen, [0, 1, 2])
        held = [
            e for e in self.net.broker.queue("driver", "pickup").entries() if e.owner
        ]
        self.assertEqual(len(held), 2)

    def test_failed_handler_tried_again(self):
        """A handler that fails gets the message again a moment later, on the same connection."""
        client = self.net.client()
        calls = []

        def handler(delivery):
            calls.append(delivery.message_id)
            if len(calls) == 1:
                raise ValueError("not now")

        client.subscribe("acme", "delivered", handler)
        client.publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])
        self.net.advance(1.0)
        self.assertEqual(calls, ["d1", "d1"])
        self.assertEqual(self.queue_ids("acme", "delivered"), [])

    def test_unsubscribe_waits_for_running_handlers(self):
        """Unsubscribing finishes the message in hand; what arrives meanwhile goes to another consumer, none twice."""
        a, b = self.net.client(), self.net.client()
        pending = defer.Deferred()
        got = {"a": [], "b": []}

        def handle_a(delivery):
            got["a"].append(delivery.message_id)
            return pending

        a.subscribe("driver", "pickup", handle_a)
        a.publish("pickup", {}, to="driver", message_id="p0")
        self.net.flush()
        b.subscribe("driver", "pickup", lambda d: got["b"].append(d.message_id))
        self.net.flush()
        a.unsubscribe("driver", "pickup")
        for n in range(1, 5):
            b.publish("pickup", {}, to="driver", message_id=f"p{n}")
        self.net.flush()
        self.assertEqual(got["a"], ["p0"])
        # Round robin sent some to a, which holds them unhandled.
        self.assertLess(len(got["b"]), 4)
        pending.callback(None)
        self.net.flush()
        self.assertEqual(got["a"], ["p0"])
        self.assertEqual(sorted(got["b"]), ["p1", "p2", "p3", "p4"])
        self.assertEqual(self.queue_ids("driver", "pickup"), [])

    def test_stop_takes_no_new_work(self):
        """Once stopping, the client finishes what it holds and hands nothing new to its handler."""
        client = self.net.client()
        publisher = self.net.client()
        pending = defer.Deferred()
        seen = []

        def handler(delivery):
            seen.append(delivery.message_id)
            return pending

        client.subscribe("acme", "delivered", handler)
        publisher.publish("delivered", {}, to="acme", message_id="d0")
        self.net.flush()
        stopped = client.stop()
        publisher.publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.assertEqual(seen, ["d0"])
        pending.callback(None)
        self.net.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.queue_ids("acme", "delivered"), ["d1"])

    def test_stop_from_handler_waits_for_ack(self):
        """A handler that stops the client still gets its message acknowledged before the close."""
        client = self.net.client()
        stops = []

        def handler(delivery):
            # The broker will refuse the acknowledgement for a while.
            self.net.broker.store.available = False
            stops.append(client.stop())

        client.subscribe("acme", "delivered", handler)
        self.net.flush()
        self.net.client().publish("delivered", {}, to="acme", message_id="d1")
        self.net.flush()
        self.assertNoResult(stops[0])
        self.net.broker.store.available = True
        self.net.advance(1.5)
        self.successResultOf(stops[0])
        self.assertEqual(self.queue_ids("acme", "delivered"), [])

    def test_publish_from_on_connect(self):
        """A publish made when the connection comes up is sent once and confirmed once."""
        client = self.net.client()
        results = []
        client.on_connect = lambda: client.publish(
            "hello-again", {}, to="log"
        ).addCallback(results.append)
        self.net.drop(self.net.pumps[0])
        self.net.advance(10)
        self.assertEqual(len(results), 1)
        self.assertEqual(len(self.queue_ids("log", "hello-again")), 1)
        self.assertTrue(client.connected)


class ClientLivenessTests(_ClientCase):
    """
    Pings, half-open connections and poison messages.
    """

    def test_ping_keeps_idle_connection(self):
        """A client with nothing to do pings often enough that the broker's idle timeout never closes it."""
        client = self.net.client()
        self.net.advance(600, step=1.0)
        self.assertTrue(client.connected)
        self.assertEqual(len(self.net.pumps), 1)

    def test_half_open_connection_dropped(self):
        """When pings go unanswered, the client drops the connection and connects again."""
        client = self.net.client()
        [pump] = self.net.pumps
        # The broker goes silent: nothing moves on this connection any more.
        self.net.pumps.remove(pump)
        self.net.reactor.advance(30)
        self.assertFalse(pump.clientIO.disconnecting)
        self.net.reactor.advance(30)
        self.assertTrue(pump.clientIO.disconnecting)
        pump.flush()
        self.assertFalse(client.connected)
        self.net.advance(10)
        self.assertTrue(client.connected)

    def test_poison_message_dead_lettered(self):
        """A message whose handler always fails is given back each time and ends in the dead letters."""
        self.net.broker.max_deliveries = 3
        client = self.net.client()
        calls = []

        def handler(delivery):
            calls.append(delivery.deliveries)
            if delivery.payload.get("poison"):
                raise ValueError("cannot handle this")

        client.subscribe("driver", "pickup", handler)
        client.publish("pickup", {"poison": True}, to="driver")
        client.publish("pickup", {"poison": False}, to="driver")
        self.net.advance(20, step=0.5)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)
        self.assertEqual(len(self.net.broker.queue("driver", "pickup")), 0)
        [dead] = self.net.broker.queue("driver", "pickup.dead").entries()
        self.assertEqual((dead.deliveries, dead.dead[0]), (3, "max-deliveries"))


class LoginTests(SynchronousTestCase):
    def setUp(self):
        from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
        from twisted.cred.portal import Portal

        from caps.acl import OpenACL
        from caps.auth import Realm

        checker = InMemoryUsernamePasswordDatabaseDontUse(acme=b"acme-password")
        self.net = MemoryNetwork(portal=Portal(Realm(OpenACL()), [checker]))

    def test_forbidden_is_final(self):
        """A frame the broker forbids fails at once and is not sent again."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = self.net.client(credentials=("acme", "acme-password"))
        client.subscribe("other", "delivered", lambda m: None)
        self.net.advance(5)
        refusals = [
            e["error"].code
            for e in events
            if e.get("log_format", "").startswith("subscribe to")
        ]
        self.assertEqual(refusals, ["forbidden"])
        self.assertIsNone(self.net.broker.queue("other", "delivered"))

    def test_logs_in_first(self):
        """With credentials, the client logs in before its subscriptions and publishes, on every connection."""
        client = self.net.client(credentials=("acme", "acme-password"))
        got = []
        client.subscribe("acme", "delivered", got.append)
        d = client.publish("delivered", {"n": 1}, to="acme")
        self.net.flush()
        self.assertEqual(self.successResultOf(d)["queues"], 1)
        self.assertEqual([m.payload for m in got], [{"n": 1}])
        self.net.drop(self.net.pumps[0])
        self.net.advance(10)
        self.assertTrue(client.connected)
        d = client.publish("delivered", {"n": 2}, to="acme")
        self.net.flush()
        self.successResultOf(d)
        self.assertEqual([m.payload for m in got], [{"n": 1}, {"n": 2}])

    def test_refused_login(self):
        """With a wrong password the client never counts as connected, sends nothing else, logs why, and tries again later."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = self.net.client(credentials=("acme", "wrong-password"))
        client.subscribe("acme", "delivered", lambda m: None)
        d = client.publish("delivered", {"n": 1}, to="acme")
        self.net.advance(1.1)
        refusals = [e for e in events if "refused the login" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 1)
        self.assertEqual(refusals[0]["error"].code, "login-failed")
        self.assertFalse(client.connected)
        self.assertNoResult(d)
        self.assertIsNone(self.net.broker.queue("acme", "delivered"))
        # It reconnects and tries again (and is refused again).
        self.net.advance(10)
        refusals = [e for e in events if "refused the login" in e.get("log_format", "")]
        self.assertGreater(len(refusals), 1)
        self.assertIsNone(self.net.broker.queue("acme", "delivered"))
