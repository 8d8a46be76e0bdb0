"""
Queues longer than the SQLite store's window: the tail waits on disk, is
read back in order as the queue drains, and memory holds at most the
window (plus what is in flight).
"""

import os
import sqlite3
import tempfile
from unittest import skipIf

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps import packed
from caps.broker import Broker
from caps.frames import encode_json
from caps.monitor import queue_row
from caps.packed import pack
from caps.store import StoreUnavailable
from caps.store.redis import RedisStore
from caps.store.sqlite import SQLiteStore

from . import redisserver
from .helpers import RecordingConnection
from .test_sqlite import HeldWrites
from .test_store import synchronous

WINDOW = 4


class _Paging:
    """
    A broker on an SQLite store with a window of four messages per queue,
    and a reactor turn that lets the store write and read.
    """

    def open_broker(self, window=WINDOW, **options):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.window = window
        self.options = options
        self.store = self.new_store()
        self.broker = Broker(self.clock, store=self.store, **options)

    def new_store(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-paging-")
        self.addCleanup(scratch.cleanup)
        self.path = os.path.join(scratch.name, "caps.sqlite3")
        return self.reopen_store()

    def reopen_store(self):
        return SQLiteStore.open(
            self.path, self.clock, runner=synchronous, window=self.window
        )

    def rows_on_disk(self, queue):
        """
        The sequence numbers the store holds for C{queue}, in order.
        """
        return [
            seq
            for (seq,) in sqlite3.connect(self.path).execute(
                "SELECT seq FROM entries WHERE qid = ? ORDER BY seq", (queue.qid,)
            )
        ]

    def tearDown(self):
        self.broker.stop()
        self.successResultOf(self.store.close())

    def restart(self):
        self.turn()
        self.broker.stop()
        self.successResultOf(self.store.close())
        self.store = self.reopen_store()
        self.broker = Broker(self.clock, store=self.store, **self.options)

    def publish_duplicate_after_window(self):
        """
        On a new broker, seven messages to (q, e), n=0 to 6, the fifth and
        sixth with the same messageId ("dup"), the sixth published after the
        dedupe window: with a window of four, both copies are on disk only.
        """
        self.open_broker()
        for n in range(4):
            self.publish(n)
        self.publish(4, message_id="dup")
        self.clock.advance(601)
        self.publish(5, message_id="dup")
        self.publish(6)

    def turn(self, count=20):
        """
        Let the store write what is pending and read back what was asked,
        a few reactor turns.
        """
        for _ in range(count):
            self.clock.advance(0)

    def publish(self, n, to="q", message_id=None):
        return self.broker.publish(
            "e", {"n": n}, encode_json({"n": n}), (to,), message_id
        )["messageId"]

    def consume(self, conn, count, prefetch=2):
        """
        Subscribe C{conn} to (q, e) and acknowledge what it gets, C{count}
        messages at most (any more it was sent stay unacknowledged); return
        their payloads' C{n}.
        """
        self.broker.subscribe(conn, "q", "e", prefetch=prefetch)
        seen = []
        for _ in range(count * 4 + 20):
            if len(seen) >= count:
                break
            taken = conn.take()
            if not taken:
                self.turn(1)
                continue
            for d in taken:
                if len(seen) < count:
                    seen.append(d["payload"]["n"])
                    self.broker.received("q", "e", d["messageId"])
        # Sent but left unacknowledged: they go back when it unsubscribes.
        conn.take()
        return seen

    def assertBounded(self, queue):
        self.assertLessEqual(queue.in_memory, self.window + 2)


class PagingTests(_Paging, SynchronousTestCase):
    def test_tail_waits_on_disk(self):
        """Past the window, messages stay on disk only; the queue still counts them."""
        self.open_broker()
        for n in range(10):
            self.publish(n)
        queue = self.broker.queue("q", "e")
        self.assertEqual((queue.in_memory, queue.spilled, len(queue)), (4, 6, 10))
        conn = RecordingConnection()
        self.broker.connect(conn)
        answer = self.broker.subscribe(conn, "q", "e", prefetch=2)
        self.assertEqual(answer["messages"], 10)

    def test_drains_in_order(self):
        """A consumer gets every message once, in publish order, as the tail is read back."""
        self.open_broker()
        for n in range(25):
            self.publish(n)
        self.turn()
        conn = RecordingConnection()
        self.broker.connect(conn)
        queue = self.broker.queue("q", "e")
        self.assertEqual(self.consume(conn, 25), list(range(25)))
        self.assertEqual(len(queue), 0)
        # Published once the tail is back in memory: straight to memory.
        self.publish(25)
        self.assertEqual((queue.in_memory, queue.spilled), (1, 0))

    def test_read_back_stays_unpacked(self):
        """A consumed queue reads its tail back in parts small enough that none of it is packed only to be unpacked when sent."""
        self.patch(packed, "UNPACKED_CONSUMED", 8)
        packs = []
        self.patch(packed, "pack", lambda *args: packs.append(args) or pack(*args))
        self.open_broker(window=20)
        for n in range(60):
            self.publish(n)
        self.turn()
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.assertEqual(self.consume(conn, 60), list(range(60)))
        self.assertEqual(packs, [])

    def test_publish_while_draining(self):
        """Messages published while the tail is on disk come after it."""
        self.open_broker()
        for n in range(8):
            self.publish(n)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=1)
        seen = []
        for n in range(8, 20):
            self.publish(n)
            self.turn(1)
            for d in conn.take():
                seen.append(d["payload"]["n"])
                self.broker.received("q", "e", d["messageId"])
            self.assertBounded(self.broker.queue("q", "e"))
        seen += self.consume(conn, 20 - len(seen), prefetch=1)
        self.assertEqual(seen, list(range(20)))

    def test_restart_keeps_memory_bounded(self):
        """After a restart only the window is read; the rest follows, in order."""
        self.open_broker()
        for n in range(30):
            self.publish(n)
        self.restart()
        queue = self.broker.queue("q", "e")
        self.assertEqual((queue.in_memory, len(queue)), (4, 30))
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.assertEqual(self.consume(conn, 30), list(range(30)))

    def test_get_all_reads_the_tail(self):
        """getAll sends everything published before it, the tail included."""
        self.open_broker()
        for n in range(12):
            self.publish(n)
        conn = RecordingConnection()
        self.broker.connect(conn)
        done = self.broker.get_all(conn, "q", "e")
        self.publish(12)
        self.turn()
        self.assertEqual(self.successResultOf(done)["count"], 12)
        self.assertEqual([d["payload"]["n"] for d in conn.take()], list(range(12)))

    def test_acknowledge_a_message_on_disk(self):
        """Acknowledging a message only the store has deletes it: it is never sent."""
        self.open_broker()
        ids = [self.publish(n) for n in range(10)]
        done = self.broker.received("q", "e", ids[7])
        self.turn()
        self.assertTrue(self.successResultOf(done)["deleted"])
        unknown = self.broker.received("q", "e", "nothing")
        self.turn()
        self.assertFalse(self.successResultOf(unknown)["deleted"])
        queue = self.broker.queue("q", "e")
        self.assertEqual(len(queue), 9)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.assertEqual(self.consume(conn, 9), [0, 1, 2, 3, 4, 5, 6, 8, 9])
        self.restart()
        self.assertEqual(len(self.broker.queue("q", "e")), 0)

    def test_delete_while_reading(self):
        """A queue deleted while its tail is being read back stays deleted and empty."""
        self.open_broker()
        for n in range(10):
            self.publish(n)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=4)
        for d in conn.take():
            self.broker.received("q", "e", d["messageId"])
        queue = self.broker.queue("q", "e")
        self.assertTrue(queue.loading)
        self.broker.unsubscribe(conn, "q", "e", delete=True)
        self.turn()
        self.assertIsNone(self.broker.queue("q", "e"))
        self.assertEqual(conn.take(), [])
        self.restart()
        self.assertIsNone(self.broker.queue("q", "e"))

    def test_requeued_dead_letters_not_doubled(self):
        """Dead letters requeued into a queue whose tail is on disk are sent once each."""
        self.open_broker(max_deliveries=1)
        for n in range(3):
            self.publish(n)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=3)
        for d in conn.take():
            self.broker.nack(conn, "q", "e", d["messageId"])
        self.assertEqual(len(self.broker.queue("q", "e.dead")), 3)
        self.broker.unsubscribe(conn, "q", "e")
        for n in range(3, 12):
            self.publish(n)
        self.assertEqual(self.broker.requeue("q", "e")["requeued"], 3)
        self.turn()
        got = self.consume(conn, 12)
        self.assertEqual(sorted(got), list(range(12)))
        self.assertEqual(len(got), 12)

    def test_restart_with_a_duplicate_in_the_window(self):
        """A messageId published again after the dedupe window, both copies read at a restart: the later copy is dropped, the first is sent once."""
        self.publish_duplicate_after_window()
        self.window = 10
        self.restart()
        queue = self.broker.queue("q", "e")
        self.assertEqual((len(queue), queue.spilled), (6, 0))
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=1, ack_timeout=5)
        got = []
        for _ in range(20):
            for d in conn.take():
                got.append((d["payload"]["n"], d["deliveries"]))
                self.broker.received("q", "e", d["messageId"])
            self.turn(1)
            self.clock.advance(1)
        self.assertEqual(got, [(n, 1) for n in (0, 1, 2, 3, 4, 6)])
        self.assertEqual(len(queue), 0)

    def test_expiry_reaches_the_tail(self):
        """Messages on disk expire too, with nobody consuming: the sweep reads the tail back."""
        self.open_broker()
        for n in range(20):
            self.broker.publish("e", {"n": n}, encode_json({"n": n}), ("q",), ttl=5)
        queue = self.broker.queue("q", "e")
        self.assertEqual(queue.spilled, 16)
        for _ in range(30):
            self.clock.advance(1)
            self.turn(2)
        self.assertEqual((len(queue), queue.spilled), (0, 0))
        self.assertEqual(len(self.broker.queue("q", "e.dead")), 20)


class RaceTests(_Paging, SynchronousTestCase):
    def requeued_past_memory(self, dies=12):
        """
        A restarted broker whose queue (q, e) has four messages in memory
        (8 to 11), three on disk (12 to 15 but C{dies}) and message C{dies}
        requeued from its dead letters, past the messages in memory; from
        here on the store's writes and reads wait for the test.

        @return: the held writes, and the messageId of message C{dies}.
        """
        self.open_broker(max_deliveries=3)
        for n in range(16):
            self.publish(n)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=16)
        self.turn()
        sent = {d["payload"]["n"]: d["messageId"] for d in conn.take()}
        self.assertEqual(sorted(sent), list(range(16)))
        for n in range(8):
            self.broker.received("q", "e", sent[n])
        # It dies: given back three times.
        self.broker.nack(conn, "q", "e", sent[dies])
        for _ in range(2):
            [again] = conn.take()
            self.broker.nack(conn, "q", "e", again["messageId"])
        self.assertEqual(len(self.broker.queue("q", "e.dead")), 1)
        self.broker.disconnect(conn)
        self.restart()
        queue = self.broker.queue("q", "e")
        self.assertEqual((queue.in_memory, queue.spilled), (4, 3))
        held = HeldWrites()
        self.store._runner = held
        self.assertEqual(self.broker.requeue("q", "e")["requeued"], 1)
        self.clock.advance(0)
        held.release()  # the requeue is written
        return held, sent[dies]

    def drain(self, held, consumed):
        """
        Let every held write and read through, then consume the rest.
        """
        while held.held:
            held.release()
            self.clock.advance(0)
        self.store._runner = synchronous
        conn = RecordingConnection()
        self.broker.connect(conn)
        return consumed + self.consume(conn, 10, prefetch=1)

    def start_consuming(self):
        """
        Take and acknowledge two messages, so that a read of the tail is
        asked for.
        """
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=1)
        seen = []
        for _ in range(2):
            [d] = conn.take()
            seen.append(d["payload"]["n"])
            self.broker.received("q", "e", d["messageId"])
        self.broker.disconnect(conn)
        return seen

    def test_requeued_after_older_messages_on_disk(self):
        """A requeued message whose older neighbours are still on disk waits for them, however slowly the tail is read: the queue is sent in publish order."""
        held, _ = self.requeued_past_memory(dies=14)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=1)
        got = []
        for _ in range(40):
            taken = conn.take()
            for d in taken:
                got.append(d["payload"]["n"])
                self.broker.received("q", "e", d["messageId"])
            if not taken:
                if not held.held:
                    break
                held.release()  # a write, or the read of the tail, done late
            self.clock.advance(0)
        self.assertEqual(got, list(range(8, 16)))

    def test_acknowledged_unsent_reads_the_tail(self):
        """When the messages in memory of a queue nobody consumes are acknowledged by id, unsent, the tail on disk is read back: the dashboard shows the age of the oldest message left, not none."""
        held, _ = self.requeued_past_memory(dies=14)
        while held.held:
            held.release()
            self.clock.advance(0)
        self.store._runner = synchronous
        queue = self.broker.queue("q", "e")
        last = queue.last_seq
        in_memory = [e.message.id for e in queue.entries() if e.message.seq <= last]
        self.assertEqual(len(in_memory), 4)
        for message_id in in_memory:
            self.broker.received("q", "e", message_id)
        self.turn()
        self.clock.advance(3600)
        row = queue_row(self.broker, queue, self.clock.seconds())
        self.assertEqual((row["depth"], queue.spilled), (4, 0))
        self.assertEqual(row["oldestAge"], 3600)

    def test_get_all_sends_requeued_after_older_messages_on_disk(self):
        """getAll sends a requeued message after its older neighbours still on disk, in publish order."""
        held, _ = self.requeued_past_memory(dies=14)
        conn = RecordingConnection()
        self.broker.connect(conn)
        done = self.broker.get_all(conn, "q", "e")
        got = [d["payload"]["n"] for d in conn.take()]
        while held.held:
            held.release()
            self.clock.advance(0)
            got += [d["payload"]["n"] for d in conn.take()]
        self.assertEqual(self.successResultOf(done)["count"], 8)
        self.assertEqual(got, list(range(8, 16)))

    def test_acknowledged_while_reading(self):
        """A requeued message acknowledged while the tail is being read back is not brought back by the read."""
        held, requeued = self.requeued_past_memory()
        seen = self.start_consuming()
        queue = self.broker.queue("q", "e")
        self.assertTrue(queue.loading)
        self.broker.received("q", "e", requeued)
        held.release()  # the read, which still finds message 12 on disk
        self.assertEqual(sorted(self.drain(held, seen)), [8, 9, 10, 11, 13, 14, 15])
        self.assertEqual(len(queue), 0)

    def test_acknowledged_before_reading(self):
        """A requeued message acknowledged just before a read of the tail is not brought back by it."""
        held, requeued = self.requeued_past_memory()
        self.broker.received("q", "e", requeued)
        seen = self.start_consuming()
        queue = self.broker.queue("q", "e")
        self.assertTrue(queue.loading)
        self.assertEqual(sorted(self.drain(held, seen)), [8, 9, 10, 11, 13, 14, 15])
        self.assertEqual(len(queue), 0)

    def test_acknowledged_during_a_read_stays_gone_after_it(self):
        """A requeued message acknowledged during one read is not brought back by the next, which reads before its delete is written."""
        self.open_broker(max_deliveries=3)
        for n in range(31):
            self.publish(n)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=31)
        sent = {}
        for _ in range(100):
            sent.update((d["payload"]["n"], d["messageId"]) for d in conn.take())
            self.turn(1)
        for n in range(8):
            self.broker.received("q", "e", sent[n])
        self.broker.nack(conn, "q", "e", sent[14])
        for _ in range(2):
            [again] = conn.take()
            self.broker.nack(conn, "q", "e", again["messageId"])
        self.broker.disconnect(conn)
        self.restart()
        queue = self.broker.queue("q", "e")
        held = HeldWrites()
        self.store._runner = held
        self.broker.requeue("q", "e")
        self.clock.advance(0)
        while held.held:
            held.release()
            self.clock.advance(0)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=1)
        got = []

        def take(ack=True):
            [d] = conn.take()
            got.append(d["payload"]["n"])
            if ack:
                self.broker.received("q", "e", d["messageId"])
            return d

        take()
        in_flight = take(ack=False)
        self.clock.advance(0)  # a batch, queued behind the first read
        self.broker.received("q", "e", sent[14])
        held.release()  # the first read
        self.broker.received("q", "e", in_flight["messageId"])
        take()
        in_flight = take(ack=False)
        held.release()  # the batch; the delete of 14 is in the next one
        held.release()  # the next read
        self.clock.advance(0)
        while held.held:
            held.release()
            self.clock.advance(0)
        self.store._runner = synchronous
        self.broker.received("q", "e", in_flight["messageId"])
        got += self.consume(conn, 30)
        self.assertEqual(sorted(got), [n for n in range(8, 31) if n != 14])
        self.assertEqual((len(queue), queue.spilled), (0, 0))
        self.assertEqual(self.rows_on_disk(queue), [])

    def test_late_acknowledgement_counted_once(self):
        """Acknowledging a message on disk that a read brings back and that is sent and acknowledged meanwhile leaves no count wrong and nothing behind."""
        self.open_broker()
        for n in range(11):
            self.publish(n, message_id=f"m{n}")
        queue = self.broker.queue("q", "e")
        self.turn()
        held = HeldWrites()
        self.store._runner = held
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.subscribe(conn, "q", "e", prefetch=1)
        got = []

        def ack_next():
            [d] = conn.take()
            got.append(d["payload"]["n"])
            self.broker.received("q", "e", d["messageId"])

        ack_next()
        ack_next()  # a read of the tail is asked for
        late = self.broker.received("q", "e", "m4")
        self.clock.advance(0)
        held.release()  # the read brings 4 back before the late delete
        for _ in range(3):
            ack_next()
        while held.held:
            held.release()
            self.clock.advance(0)
        self.assertTrue(self.successResultOf(late)["deleted"])
        self.store._runner = synchronous
        got += self.consume(conn, 11)
        self.assertEqual(sorted(got), list(range(11)))
        self.assertEqual((len(queue), queue.spilled), (0, 0))
        self.assertEqual(self.rows_on_disk(queue), [])

    def test_failed_read_still_waits(self):
        """When the read that had to wait for a delete fails, its retry waits too."""
        held, requeued = self.requeued_past_memory()
        while held.held:
            held.release()
            self.clock.advance(0)
        failing = [True]

        def runner(f, *args):
            if getattr(f, "__name__", None) == "_write_batch" and failing[0]:
                failing[0] = False
                return defer.fail(OSError("disk I/O error"))
            return synchronous(f, *args)

        self.store._runner = runner
        self.broker.received("q", "e", requeued)
        seen = self.start_consuming()
        self.clock.advance(0)  # the batch with the delete fails
        self.clock.advance(1.0)  # the read and the store both try again
        self.turn()
        self.store._runner = synchronous
        self.assertEqual(sorted(self.drain(held, seen)), [8, 9, 10, 11, 13, 14, 15])
        self.assertEqual(len(self.flushLoggedErrors(OSError, StoreUnavailable)), 2)


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 6)),
        st.tuples(st.just("consume"), st.integers(1, 8)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=25,
)


class EquivalenceTests(_Paging, SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(STEPS)
    def test_same_as_all_in_memory(self, steps):
        """Whatever is published, consumed and restarted, a window of four delivers what one large enough to hold everything does."""
        self.check_equivalent(steps)

    def check_equivalent(self, steps):
        delivered = []
        for window in (WINDOW, 10_000):
            self.open_broker(window=window)
            conn = RecordingConnection()
            self.broker.connect(conn)
            seen, n = [], 0
            for action, count in steps:
                if action == "publish":
                    for _ in range(count):
                        self.publish(n)
                        n += 1
                elif action == "consume":
                    seen += self.consume(conn, count, prefetch=1)
                    self.broker.unsubscribe(conn, "q", "e")
                    self.turn()
                else:
                    self.restart()
                    conn = RecordingConnection()
                    self.broker.connect(conn)
                self.assertBounded(self.broker.queue("q", "e") or _Empty())
            seen += self.consume(conn, n)
            delivered.append(seen)
            self.tearDown()
        self.assertEqual(delivered[0], delivered[1])
        self.assertEqual(sorted(set(delivered[0])), list(range(n)))


class _Empty:
    in_memory = 0


class _OnRedis:
    """
    The same tests on the Redis store (the shared test server, emptied).
    """

    def new_store(self):
        server = redisserver.shared()
        server.client().flushall()
        self.url = server.url
        return self.reopen_store()

    def reopen_store(self):
        return RedisStore.open(
            self.url, self.clock, runner=synchronous, window=self.window
        )

    def rows_on_disk(self, queue):
        seqs = (
            redisserver.shared().client().zrange(f"caps:{{q{queue.qid}}}:seqs", 0, -1)
        )
        return [int(seq) for seq in seqs]


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisPagingTests(_OnRedis, PagingTests):
    pass


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisRaceTests(_OnRedis, RaceTests):
    pass


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisEquivalenceTests(_OnRedis, EquivalenceTests):
    # A test of its own: hypothesis runs one test function from one class.
    @settings(max_examples=50, deadline=None)
    @given(STEPS)
    def test_same_as_all_in_memory(self, steps):
        """On Redis too, a window of four delivers what one large enough to hold everything does."""
        self.check_equivalent(steps)
