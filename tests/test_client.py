"""
Tests for caps.client against a real broker in memory (iosim), with time
driven by a fake clock.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from caps.client import CapsError

from .helpers import MemoryNetwork


class ClientTests(SynchronousTestCase):
    def setUp(self):
        self.net = MemoryNetwork()

    def queue_ids(self, client_id, event):
        queue = self.net.broker.queue(client_id, event)
        return [] if queue is None else list(queue._entries)

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
        d = client.publish("nack", {})
        self.net.flush()
        self.assertEqual(
            self.failureResultOf(d, CapsError).value.code, "reserved-event"
        )
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
