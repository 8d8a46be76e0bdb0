"""
Tests for caps.packed and the queue's fresh messages kept packed: finding
them by messageId (broker-made, client-given, look-alikes), removing them
while ready, and the broker's dedupe without counting broker-made ids.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps import packed
from caps.broker import Broker
from caps.frames import encode_json
from caps.message import Message
from caps.packed import Fresh, header, pack, unpack
from caps.queue import Queue

from .helpers import RecordingConnection


def fresh_of(ids, first=1):
    fresh = Fresh("e")
    for seq, message_id in enumerate(ids, first):
        fresh.append(Message(message_id, "e", b"{}", seq, 1.5))
    return fresh


class PackTests(SynchronousTestCase):
    def test_round_trip(self):
        """A record gives back every field of its message, expiry or none, own event or another."""
        for message in [
            Message("b1c2-7", "e", b'{"a":"\xc3\xa9"}', 7, 1700000000.25),
            Message("\u00e9t\u00e9", "other", b"[]", 2**40, 3.0, 9.5),
            Message("", "", b"", 0, 0.0, 0.0),
            # Longer than 16 bits can count (with a large --max-line)
            Message("i" * 70_000, "o" * 70_000, b"1", 1, 1.0),
        ]:
            record = pack(message, "e")
            back = unpack(record, "e")
            self.assertEqual(
                (back.id, back.event, back.payload, back.seq, back.time, back.expires),
                (
                    message.id,
                    message.event,
                    message.payload,
                    message.seq,
                    message.time,
                    message.expires,
                ),
            )
            self.assertEqual(
                header(record), (message.seq, message.time, message.expires)
            )

    def test_broker_made_ids_need_no_map(self):
        """Records whose messageId ends in -<seq> are found by bisection, with no messageId kept aside."""
        fresh = fresh_of([f"abc-{seq}" for seq in range(1, 101)])
        self.assertEqual(fresh._ids, {})
        for seq in (1, 50, 100):
            index = fresh.find(f"abc-{seq}")
            self.assertEqual(fresh.message_at(index).seq, seq)
        for missing in (
            "abc-0",
            "abc-101",
            "abc-050",
            "zzz-50",
            "abc-",
            "50",
            "abc-5x",
        ):
            self.assertEqual(fresh.find(missing), -1, missing)

    def test_other_ids(self):
        """MessageIds not ending in their own sequence number are found through the map, packed or not, and look-alikes are not confused."""
        # seq 1: "m1"; 2: "x-012"; 3: "x-2" (names seq 2's number); 4: "y-4"
        ids = ["m1", "x-012", "x-2", "y-4", "\u0663-\u0665", "last"]
        odd = {"m1", "x-012", "x-2", "\u0663-\u0665", "last"}
        for unpacked in (0, 1, 3, 64):
            self.patch(packed, "UNPACKED", unpacked)
            fresh = fresh_of(ids)
            kinds = [type(item) for item in fresh.items]
            left = min(unpacked, len(ids))
            self.assertEqual(
                kinds, [bytes] * (len(ids) - left) + [Message] * left, unpacked
            )
            self.assertEqual(set(fresh._ids), odd)
            for seq, message_id in enumerate(ids, 1):
                index = fresh.find(message_id)
                self.assertEqual(fresh.message_at(index).seq, seq, message_id)
            self.assertEqual(fresh.find("x-4"), -1)
            self.assertEqual(fresh.find("x-3"), -1)
            self.assertEqual(fresh.take(fresh.find("last")).seq, 6)
            self.assertEqual(fresh.find("last"), -1)
            self.assertEqual(fresh.popleft().id, "m1")
            self.assertEqual(fresh.find("m1"), -1)
            self.assertEqual(fresh.count, 4)

    def test_newest_unpacked_counted_from_the_head(self):
        """A consumed queue packs a message only once more than UNPACKED_CONSUMED are ready, however many were taken from its front."""
        packs = []
        self.patch(packed, "pack", lambda *args: packs.append(args) or pack(*args))
        fresh = Fresh("e")
        limit = packed.UNPACKED_CONSUMED
        seq = 0
        for _ in range(3):
            while fresh.count < limit:
                seq += 1
                fresh.append(Message(f"a-{seq}", "e", b"{}", seq, 1.5), True)
            # A quarter taken: not enough for the list to be compacted.
            while fresh.count > limit * 3 // 4:
                fresh.popleft()
        self.assertEqual(packs, [])
        for _ in range(limit // 4 + 1):
            seq += 1
            fresh.append(Message(f"a-{seq}", "e", b"{}", seq, 1.5), True)
        self.assertEqual(len(packs), 1)

    def test_take_and_pop(self):
        """Removing records from the middle keeps the rest findable, and taking from the front skips them."""
        self.patch(packed, "UNPACKED", 64)
        fresh = fresh_of([f"p-{seq}" for seq in range(1, 3001)] + ["odd"])
        for seq in range(2, 3001, 2):
            fresh.take(fresh.find(f"p-{seq}"))
        fresh.take(fresh.find("odd"))
        self.assertEqual((fresh.count, fresh._ids), (1500, {}))
        # All packed but the newest.
        newest = -packed.UNPACKED
        self.assertEqual({type(item) for item in fresh.items[:newest]}, {bytes, int})
        self.assertEqual({type(item) for item in fresh.items[newest:]}, {Message, int})
        taken = []
        for _ in range(1200):
            taken.append(fresh.popleft().seq)
        self.assertEqual(taken, list(range(1, 2400, 2)))
        # Compacted on the way; what is left is still found.
        self.assertLess(len(fresh.items), 3001)
        self.assertEqual(fresh.message_at(fresh.find("p-2999")).seq, 2999)
        self.assertEqual(fresh.find("p-2001"), -1)
        self.assertEqual(fresh.find("p-2000"), -1)
        self.assertEqual(len(list(fresh.messages())), 300)
        self.assertEqual([m.seq for m in fresh.after(2995)], [2997, 2999])
        self.assertEqual(fresh.count_after(2995), 2)
        self.assertEqual(list(fresh.ids())[-2:], [(2997, "p-2997"), (2999, "p-2999")])


class PackedQueueTests(SynchronousTestCase):
    def test_remove_ready_keeps_order(self):
        """A ready message removed by messageId is never handed out; the others come out in order."""
        self.patch(packed, "UNPACKED", 2)
        queue = Queue("c", "e")
        for seq in range(1, 6):
            queue.append(Message(f"k-{seq}", "e", b"{}", seq, 0.0))
        queue.append(Message("given", "e", b"{}", 6, 0.0))
        self.assertIn("k-3", queue)
        self.assertIn("given", queue)
        removed = queue.remove("k-3")
        self.assertEqual((removed.message.id, removed.removed), ("k-3", True))
        self.assertIsNone(queue.remove("k-3"))
        self.assertNotIn("k-3", queue)
        self.assertEqual(queue.remove("given").message.seq, 6)
        self.assertEqual(len(queue), 4)
        out = []
        while (entry := queue.pop_ready()) is not None:
            out.append(entry.message.id)
        self.assertEqual(out, ["k-1", "k-2", "k-4", "k-5"])
        # Sent messages have an entry of their own now.
        self.assertIs(queue.get("k-1"), queue.get("k-1"))


class PackedBrokerTests(SynchronousTestCase):
    """
    The broker with every fresh message packed at once.
    """

    unpacked = 0

    def setUp(self):
        self.patch(packed, "UNPACKED", self.unpacked)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.broker = Broker(self.clock)

    def publish(self, n, message_id=None):
        payload = {"n": n}
        return self.broker.publish(
            "e", payload, encode_json(payload), ("q",), message_id
        )["messageId"]

    def consume(self):
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e")
        return [d["payload"]["n"] for d in conn.take()]

    def test_ack_ready_by_broker_id(self):
        """A message never sent is acknowledged by its broker-made messageId, and the rest are sent in order."""
        ids = [self.publish(n) for n in range(5)]
        self.assertEqual(self.broker._state.live, {})
        answer = self.broker.received("q", "e", ids[2])
        self.assertTrue(answer["deleted"])
        self.assertFalse(self.broker.received("q", "e", ids[2])["deleted"])
        self.assertEqual(len(self.broker.queue("q", "e")), 4)
        self.assertEqual(self.consume(), [0, 1, 3, 4])

    def test_ack_ready_by_client_id(self):
        """A message never sent is acknowledged by its client-given messageId, a look-alike of a broker-made one included."""
        self.publish(0)
        self.publish(1, "order-17")
        self.publish(2, "order-3")  # its sequence number is 3
        self.publish(3, "x-2")  # names message 2's number
        self.publish(4)
        for message_id in ("order-17", "x-2"):
            self.assertTrue(self.broker.received("q", "e", message_id)["deleted"])
        self.assertEqual(self.consume(), [0, 2, 4])
        self.assertEqual(set(self.broker._state.live), {"order-3"})

    def test_client_copy_of_broker_id(self):
        """A client-given messageId equal to a broker-made one still queued is a duplicate; once acknowledged, it is new."""
        made = self.publish(0)
        self.assertTrue(
            self.broker.publish("e", {}, b"{}", ("other",), made).get("duplicate")
        )
        self.broker.received("q", "e", made)
        self.assertEqual(self.publish(1, made), made)
        self.assertTrue(self.broker.publish("e", {}, b"{}", (), made).get("duplicate"))

    def test_skipped_id_counted(self):
        """A broker-made messageId that skips one a client took is counted while queued and released when acknowledged."""
        prefix = self.broker._id_prefix
        self.publish(0, f"{prefix}2")
        skipped = self.publish(1)
        self.assertEqual(skipped, f"{prefix}3")
        self.assertEqual(self.broker._state.live, {f"{prefix}2": 1, skipped: 1})
        self.assertTrue(self.broker.received("q", "e", skipped)["deleted"])
        self.assertEqual(self.broker._state.live, {f"{prefix}2": 1})
        self.assertEqual(self.consume(), [0])

    def test_nack_ready(self):
        """Giving back a message that was never sent does nothing."""
        made = self.publish(0)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.assertFalse(self.broker.nack(conn, "q", "e", made)["nacked"])
        self.assertEqual(len(self.broker.queue("q", "e")), 1)

    def test_peek_and_purge(self):
        """Peek shows given-back and fresh messages in order; purge removes all but those in flight."""
        ids = [self.publish(n) for n in range(6)]
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=3)
        self.broker.nack(conn, "q", "e", ids[1])
        rows, more = self.broker.peek("q", "e", after=0, limit=4)
        self.assertEqual([r["messageId"] for r in rows], ids[:4])
        self.assertEqual(
            [(r["deliveries"], r["inFlight"]) for r in rows],
            [(1, True), (2, True), (1, True), (0, False)],
        )
        self.assertEqual(more, 2)
        rows, more = self.broker.peek("q", "e", after=rows[-1]["seq"], limit=1)
        self.assertEqual(([r["messageId"] for r in rows], more), ([ids[4]], 1))
        self.assertEqual(self.broker.purge("q", "e"), 3)
        self.assertEqual(len(self.broker.queue("q", "e")), 3)

    def test_restart_counts_other_brokers_ids(self):
        """A broker started on another's memory store counts the messageIds that one made: a client copying one is a duplicate."""
        made = self.publish(0)
        store = self.broker.store
        self.broker.stop()
        self.broker = Broker(self.clock, store)
        self.assertEqual(self.broker._state.live, {made: 1})
        self.assertTrue(
            self.broker.publish("e", {}, b"{}", ("other",), made).get("duplicate")
        )
        self.assertTrue(self.broker.received("q", "e", made)["deleted"])
        self.assertEqual(self.broker._state.live, {})


class UnpackedBrokerTests(PackedBrokerTests):
    """
    The same, with the newest fresh messages left unpacked (as many as
    the tests publish).
    """

    unpacked = 64
