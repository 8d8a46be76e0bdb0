"""
Delivery control in the broker: ack timeouts, nack, dead letters and
requeue, in-flight windows, flow control, queue limits and expiry, with
time from a fake clock.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker, QueueFull
from caps.frames import encode_json

from .helpers import RecordingConnection


class _BrokerCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.broker = self.make_broker()
        self.addCleanup(self.no_timers_left)

    def make_broker(self, **kw):
        return Broker(self.clock, **kw)

    def no_timers_left(self):
        self.broker.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def connect(self, name="conn"):
        conn = RecordingConnection(name)
        self.broker.connect(conn)
        return conn

    def publish(self, n, to="driver", event="pickup", ttl=None, message_id=None):
        payload = {"n": n}
        return self.broker.publish(
            event, payload, encode_json(payload), (to,), message_id, ttl
        )["messageId"]

    def ns(self, conn):
        return [d["payload"]["n"] for d in conn.take()]

    def held(self, client_id="driver", event="pickup"):
        queue = self.broker.queue(client_id, event)
        return sorted(e.message.id for e in queue.entries() if e.owner is not None)


class AckTimeoutTests(_BrokerCase):
    def test_unacknowledged_goes_back(self):
        """A message not acknowledged within the ack timeout goes back and is sent again, flagged."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "driver", "pickup")
        self.publish(0)
        self.assertEqual(self.ns(a), [0])
        self.broker.subscribe(b, "driver", "pickup")
        self.clock.advance(29.9)
        self.assertEqual(b.deliveries, [])
        self.clock.advance(0.1)
        [again] = b.take() or a.take()
        self.assertEqual((again["redelivered"], again["deliveries"]), (True, 2))

    def test_per_subscription_timeout(self):
        """A subscription's own ackTimeout wins over the broker's; 0 turns it off."""
        quick, never = self.connect("quick"), self.connect("never")
        self.broker.subscribe(quick, "q1", "e1", ack_timeout=2)
        self.broker.subscribe(never, "q2", "e2", ack_timeout=0)
        self.publish(1, to="q1", event="e1")
        self.publish(2, to="q2", event="e2")
        quick.take()
        never.take()
        self.clock.advance(2)
        self.assertEqual(self.ns(quick), [1])
        self.clock.advance(3600)
        self.assertEqual(never.deliveries, [])
        self.assertEqual(len(self.broker.queue("q2", "e2")), 1)

    def test_late_ack_still_deletes(self):
        """After a timeout, the first consumer's late ack deletes the message; the second's is harmless."""
        a = self.connect("a")
        self.broker.subscribe(a, "driver", "pickup", ack_timeout=5)
        mid = self.publish(0)
        self.clock.advance(5)
        self.assertEqual([d["deliveries"] for d in a.take()], [1, 2])
        self.assertTrue(self.broker.received("driver", "pickup", mid)["deleted"])
        self.assertFalse(self.broker.received("driver", "pickup", mid)["deleted"])
        self.clock.advance(60)
        self.assertEqual(a.deliveries, [])

    def test_acknowledged_in_time(self):
        """A message acknowledged in time is not sent again when its timeout would have come."""
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", ack_timeout=5)
        mid = self.publish(0)
        self.clock.advance(4)
        self.broker.received("driver", "pickup", mid)
        self.clock.advance(10)
        self.assertEqual(len(a.take()), 1)

    def test_get_all_deliveries_time_out(self):
        """Messages sent by getAll go back after the broker's ack timeout too."""
        self.broker = self.make_broker(ack_timeout=10)
        poller = self.connect()
        self.publish(0, to="acme", event="delivered")
        self.successResultOf(self.broker.get_all(poller, "acme", "delivered"))
        self.clock.advance(10)
        self.assertEqual(
            self.successResultOf(self.broker.get_all(poller, "acme", "delivered"))[
                "count"
            ],
            1,
        )
        self.assertEqual([d["deliveries"] for d in poller.take()], [1, 2])


class AckTimeoutMoreTests(_BrokerCase):
    def test_shorter_timeout_on_resubscribe(self):
        """Subscribing again with a shorter ackTimeout shortens the wait for messages already held."""
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", ack_timeout=100)
        self.publish(0)
        a.take()
        self.broker.subscribe(a, "driver", "pickup", ack_timeout=1)
        self.publish(1)
        self.clock.advance(1)
        self.assertEqual(sorted(d["payload"]["n"] for d in a.take()), [0, 1, 1])

    def test_timeout_given_to_untimed(self):
        """Messages sent under ackTimeout 0 get the new timeout when the consumer subscribes again with one."""
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", prefetch=1, ack_timeout=0)
        mid = self.publish(0)
        self.publish(1)
        self.assertEqual(a.ids(), [mid])
        self.clock.advance(100)
        self.broker.subscribe(a, "driver", "pickup", prefetch=1, ack_timeout=1)
        self.assertEqual(len(a.take()), 1)
        self.clock.advance(1)
        # Back in the queue, and sent again (the oldest first).
        [again] = a.take()
        self.assertEqual((again["messageId"], again["deliveries"]), (mid, 2))

    def test_many_timeouts_at_once(self):
        """Tens of thousands of messages timing out together go back in one pass, in order."""
        self.broker = self.make_broker(ack_timeout=5, max_unacked=20_000)
        poller = self.connect()
        for n in range(20_000):
            self.publish(n, to="acme", event="delivered")
        self.successResultOf(self.broker.get_all(poller, "acme", "delivered"))
        poller.take()
        self.clock.advance(5)
        result = self.successResultOf(self.broker.get_all(poller, "acme", "delivered"))
        self.assertEqual(result["count"], 20_000)
        self.assertEqual(self.ns(poller), list(range(20_000)))

    def test_late_ack_after_dead_letter(self):
        """A late acknowledgement deletes a message even after it went to the dead letters."""
        self.broker = self.make_broker(max_deliveries=2)
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", ack_timeout=1)
        mid = self.publish(0)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)
        self.assertTrue(self.broker.received("driver", "pickup", mid)["deleted"])
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 0)


class NackTests(_BrokerCase):
    def test_nack_now(self):
        """A nacked message is ready again at once, at its place."""
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", prefetch=1)
        first = self.publish(0)
        self.publish(1)
        self.assertEqual(self.ns(a), [0])
        result = self.broker.nack(a, "driver", "pickup", first)
        self.assertTrue(result["nacked"])
        self.assertEqual(
            [(d["payload"]["n"], d["redelivered"]) for d in a.take()], [(0, True)]
        )

    def test_nack_with_delay(self):
        """A message nacked with a delay waits; the rest of the queue keeps flowing."""
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", prefetch=1)
        first = self.publish(0)
        second = self.publish(1)
        a.take()
        self.broker.nack(a, "driver", "pickup", first, delay=10)
        self.assertEqual(self.ns(a), [1])
        self.broker.received("driver", "pickup", second)
        self.clock.advance(9.9)
        self.assertEqual(a.deliveries, [])
        self.clock.advance(0.1)
        self.assertEqual(self.ns(a), [0])

    def test_nack_only_by_holder(self):
        """Only the connection a message is in flight to can nack it."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "driver", "pickup")
        mid = self.publish(0)
        self.assertFalse(self.broker.nack(b, "driver", "pickup", mid)["nacked"])
        self.assertFalse(self.broker.nack(b, "driver", "pickup", "nope")["nacked"])
        self.assertFalse(self.broker.nack(b, "ghost", "pickup", mid)["nacked"])
        self.assertEqual(self.held(), [mid])


class DeadLetterTests(_BrokerCase):
    def test_poison_message(self):
        """A message every consumer gives back goes to the dead letters after max deliveries; the rest flow."""
        self.broker = self.make_broker(max_deliveries=5)
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", prefetch=1)
        poison = self.publish(0)
        for n in range(1, 4):
            self.publish(n)
        handled = []
        for _ in range(20):
            batch = a.take()
            if not batch:
                break
            for d in batch:
                if d["payload"]["n"] == 0:
                    self.broker.nack(a, "driver", "pickup", d["messageId"])
                else:
                    handled.append(d["payload"]["n"])
                    self.broker.received("driver", "pickup", d["messageId"])
        self.assertEqual(handled, [1, 2, 3])
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 0)
        dead = self.broker.queue("driver", "pickup.dead")
        [entry] = dead.entries()
        self.assertEqual(entry.message.id, poison)
        self.assertEqual(entry.deliveries, 5)
        self.assertEqual(entry.dead, ("max-deliveries", self.clock.seconds()))

    def test_dead_letters_are_a_queue(self):
        """Dead letters can be consumed and acknowledged like any queue, with why they died."""
        self.broker = self.make_broker(max_deliveries=1)
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup")
        mid = self.publish(0)
        a.take()
        self.broker.nack(a, "driver", "pickup", mid)
        reader = self.connect("reader")
        self.broker.subscribe(reader, "driver", "pickup.dead")
        [d] = reader.take()
        self.assertEqual(
            (d["clientId"], d["event"], d["messageId"]), ("driver", "pickup.dead", mid)
        )
        self.assertEqual(d["payload"], {"n": 0})
        self.assertTrue(self.broker.received("driver", "pickup.dead", mid)["deleted"])
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 0)

    def test_requeue_all(self):
        """requeue moves every dead letter back, at its place, with its count reset."""
        self.broker = self.make_broker(max_deliveries=1)
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", prefetch=1)
        ids = [self.publish(n) for n in range(3)]
        for mid in ids[:2]:
            a.take()
            self.broker.nack(a, "driver", "pickup", mid)
        self.assertEqual(self.ns(a), [2])
        result = self.broker.requeue("driver", "pickup")
        self.assertEqual(result["requeued"], 2)
        self.broker.received("driver", "pickup", ids[2])
        [d] = a.take()
        self.assertEqual((d["payload"]["n"], d["deliveries"]), (0, 1))

    def test_requeue_one(self):
        """requeue with a messageId moves only that one; unknown ids move nothing."""
        self.broker = self.make_broker(max_deliveries=1)
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup")
        ids = [self.publish(n) for n in range(2)]
        for mid in ids:
            self.broker.nack(a, "driver", "pickup", mid)
        a.take()
        self.broker.unsubscribe(a, "driver", "pickup")
        self.assertEqual(self.broker.requeue("driver", "pickup", ids[1])["requeued"], 1)
        self.assertEqual(self.broker.requeue("driver", "pickup", "nope")["requeued"], 0)
        self.assertEqual(self.broker.requeue("ghost", "pickup")["requeued"], 0)
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 1)


class RequeueLimitTests(_BrokerCase):
    def test_requeue_up_to_the_limit(self):
        """requeue moves only as many dead letters as the queue has room for."""
        self.broker = self.make_broker(max_deliveries=1)
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", max_length=2)
        for n in range(2):
            self.broker.nack(a, "driver", "pickup", self.publish(n))
        self.broker.unsubscribe(a, "driver", "pickup")
        self.publish(2)
        self.assertEqual(self.broker.requeue("driver", "pickup")["requeued"], 1)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 2)
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)


class WindowTests(_BrokerCase):
    def test_prefetch(self):
        """A consumer never holds more than its prefetch; acknowledging refills it."""
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup", prefetch=3)
        ids = [self.publish(n) for n in range(10)]
        self.assertEqual(self.ns(a), [0, 1, 2])
        self.broker.received("driver", "pickup", ids[0])
        self.assertEqual(self.ns(a), [3])
        self.assertEqual(len(self.held()), 3)

    def test_fair_share(self):
        """Messages go round robin to the consumers that have room."""
        a, b, c = self.connect("a"), self.connect("b"), self.connect("c")
        self.broker.subscribe(a, "driver", "pickup", prefetch=2)
        self.broker.subscribe(b, "driver", "pickup", prefetch=2)
        self.broker.subscribe(c, "driver", "pickup", prefetch=10)
        for n in range(9):
            self.publish(n)
        self.assertEqual((len(a.take()), len(b.take()), len(c.take())), (2, 2, 5))

    def test_backlog_spread_on_subscribe(self):
        """A backlog is shared with a consumer that joins while the first is full."""
        a = self.connect("a")
        self.broker.subscribe(a, "driver", "pickup", prefetch=2)
        for n in range(5):
            self.publish(n)
        b = self.connect("b")
        self.broker.subscribe(b, "driver", "pickup", prefetch=2)
        self.assertEqual((self.ns(a), self.ns(b)), ([0, 1], [2, 3]))

    def test_paused_connection(self):
        """A connection that cannot take more gets nothing until it can; others keep going."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "driver", "pickup")
        self.broker.subscribe(b, "driver", "pickup")
        self.broker.pause(a)
        for n in range(4):
            self.publish(n)
        self.assertEqual((self.ns(a), self.ns(b)), ([], [0, 1, 2, 3]))
        self.broker.resume(a)
        self.publish(4)
        self.publish(5)
        self.assertEqual(len(a.take()), 1)

    def test_stuck_consumer_times_out(self):
        """A consumer that stops reading loses its messages to others when they time out."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "driver", "pickup", ack_timeout=10)
        self.publish(0)
        a.take()
        self.broker.pause(a)
        self.broker.subscribe(b, "driver", "pickup")
        self.clock.advance(10)
        self.assertEqual(self.ns(b), [0])

    def test_get_all_covers_what_was_there(self):
        """getAll ends after the messages ready when it was asked for, even as new ones keep coming."""
        for n in range(3):
            self.publish(n, to="acme", event="delivered")
        poller = PausingConnection(self.broker, pause_after=2)
        self.broker.connect(poller)
        done = self.broker.get_all(poller, "acme", "delivered")
        for n in range(3, 6):
            self.publish(n, to="acme", event="delivered")
        poller.pause_after = 100
        self.broker.resume(poller)
        self.assertEqual(self.successResultOf(done)["count"], 3)

    def test_dropped_consumers_do_not_pile_up(self):
        """Consumers that come and go on an idle queue leave nothing behind in its round robin."""
        steady = self.connect("steady")
        self.broker.subscribe(steady, "driver", "pickup")
        for n in range(100):
            passing = self.connect(f"passing{n}")
            self.broker.subscribe(passing, "driver", "pickup")
            self.broker.disconnect(passing)
        self.assertEqual(len(self.broker.queue("driver", "pickup").with_room), 1)

    def test_get_all_streams(self):
        """getAll sends the whole backlog regardless of prefetch, pausing while the connection is full."""
        for n in range(10):
            self.publish(n, to="acme", event="delivered")
        poller = PausingConnection(self.broker, pause_after=3)
        self.broker.connect(poller)
        done = self.broker.get_all(poller, "acme", "delivered")
        self.assertNoResult(done)
        self.assertEqual(len(poller.deliveries), 3)
        poller.pause_after = 100
        self.broker.resume(poller)
        self.assertEqual(self.successResultOf(done)["count"], 10)
        self.assertEqual(
            [d["payload"]["n"] for d in poller.deliveries], list(range(10))
        )


class PausingConnection(RecordingConnection):
    """
    A connection whose send buffer fills up after a number of messages.
    """

    def __init__(self, broker, pause_after):
        super().__init__("pausing")
        self.broker = broker
        self.pause_after = pause_after

    def deliver(self, entry):
        super().deliver(entry)
        if len(self.deliveries) >= self.pause_after:
            self.broker.pause(self)


class LimitTests(_BrokerCase):
    def test_max_queue(self):
        """A full queue refuses publishes, naming itself; nothing is stored anywhere."""
        self.broker = self.make_broker(max_queue=3)
        logger = self.connect()
        self.broker.subscribe(logger, "logger", "pickup", prefetch=1)
        for n in range(3):
            self.publish(n, to="driver")
        e = self.assertRaises(QueueFull, self.publish, 3, "driver")
        self.assertEqual(e.code, "queue-full")
        self.assertIn("(driver, pickup)", e.message)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 3)
        self.assertEqual(len(self.broker.queue("logger", "pickup")), 3)
        # The refused messageId was not remembered: a retry can succeed later.
        self.assertRaises(QueueFull, self.publish, 3, "driver", message_id="retry")
        self.broker.unsubscribe(self.connect(), "driver", "pickup", delete=True)
        self.broker.unsubscribe(logger, "logger", "pickup", delete=True)
        self.assertEqual(self.publish(3, message_id="retry"), "retry")

    def test_refused_publish_creates_nothing(self):
        """A publish refused as full does not even create the other addressees' queues."""
        self.broker = self.make_broker(max_queue=1)
        self.publish(0, to="driver")
        self.assertRaises(
            QueueFull,
            self.broker.publish,
            "pickup",
            {},
            b"{}",
            ("driver", "newcomer"),
        )
        self.assertIsNone(self.broker.queue("newcomer", "pickup"))

    def test_max_length(self):
        """A subscription's maxLength limits its queue below the broker's limit."""
        vendor = self.connect()
        self.broker.subscribe(vendor, "acme", "delivered", prefetch=1, max_length=2)
        self.publish(0, to="acme", event="delivered")
        self.publish(1, to="acme", event="delivered")
        self.assertRaises(QueueFull, self.publish, 2, "acme", "delivered")


class ExpiryTests(_BrokerCase):
    def test_ttl_with_nobody_consuming(self):
        """A message whose ttl passes moves to the dead letters, even with no consumer."""
        self.publish(0, ttl=5)
        self.publish(1)
        self.clock.advance(6)
        dead = self.broker.queue("driver", "pickup.dead")
        [entry] = dead.entries()
        self.assertEqual(entry.dead[0], "expired")
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 1)

    def test_expired_not_delivered(self):
        """A consumer never gets a message past its ttl."""
        self.publish(0, ttl=5)
        self.clock.pump([4.9, 0.2])
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup")
        self.assertEqual(a.deliveries, [])

    def test_default_ttl(self):
        """The broker's default ttl applies when a publish gives none."""
        self.broker = self.make_broker(default_ttl=60)
        self.publish(0)
        self.publish(1, ttl=600)
        self.clock.advance(61)
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 1)

    def test_expires_in_flight(self):
        """A message that expires while in flight dies when it comes back, not before."""
        a = self.connect()
        self.broker.subscribe(a, "driver", "pickup")
        mid = self.publish(0, ttl=5)
        self.clock.advance(10)
        self.assertEqual(self.held(), [mid])
        self.broker.nack(a, "driver", "pickup", mid)
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)

    def test_requeued_expired_message_expires_again(self):
        """A message requeued after its ttl passed goes straight back to the dead letters, on the next sweep."""
        self.publish(0, ttl=1)
        self.clock.advance(2)
        self.assertEqual(self.broker.requeue("driver", "pickup")["requeued"], 1)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 0)
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)

    def test_dead_letters_do_not_expire(self):
        """Dead letters stay until someone deals with them."""
        self.publish(0, ttl=1)
        self.clock.advance(2)
        self.clock.advance(3600 * 24)
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)
