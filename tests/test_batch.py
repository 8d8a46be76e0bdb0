"""
Tests for caps.store.batch: a coalesced batch leaves the file exactly as
the changes one by one would.
"""

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caps.store import schema
from caps.store.batch import coalesce

QIDS = (1, 2, 3)
IDS = ("a", "b", "c")


def database():
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.executescript(schema.SCHEMA)
    for qid in QIDS:
        connection.execute(schema.SAVE_QUEUE, (qid, f"c{qid}", "e", 1, None, None))
    return connection


def contents(connection):
    return {
        table: sorted(connection.execute(f"SELECT * FROM {table}").fetchall())
        for table in ("queues", "entries", "dedupe")
    }


def row(qid, seq, deliveries, reason=None, died=None):
    """
    A queue's row of message C{seq}.
    """
    return (qid, seq, f"m{seq}", "e", b"{}", 1.5, None, deliveries, reason, died)


class _Broker:
    """
    Makes the changes a broker would, in valid orders, drawn by hypothesis.
    """

    def __init__(self, data):
        self.data = data
        self.seq = 0
        # (qid, seq) -> deliveries
        self.entries = {}
        self.ops = []

    def record(self, sql, *params):
        self.ops.append((sql, params))

    def publish(self):
        self.seq += 1
        seq = self.seq
        qids = self.data.draw(st.sets(st.sampled_from(QIDS), min_size=1))
        for qid in sorted(qids):
            self.record(schema.ADD_ENTRY, *row(qid, seq, 0))
            self.entries[qid, seq] = 0

    def pick(self):
        return self.data.draw(st.sampled_from(sorted(self.entries)))

    def deliver(self):
        qid, seq = self.pick()
        self.entries[qid, seq] += 1
        self.record(schema.DELIVERED, self.entries[qid, seq], qid, seq)

    def remove(self, qid=None, seq=None):
        if qid is None:
            qid, seq = self.pick()
        del self.entries[qid, seq]
        self.record(schema.REMOVE_ENTRY, qid, seq)

    def move(self):
        qid, seq = self.pick()
        free = [q for q in QIDS if (q, seq) not in self.entries]
        if not free:
            return
        target = self.data.draw(st.sampled_from(free))
        deliveries = self.entries[qid, seq]
        # As the broker moves a message: into the target, then out of the source.
        self.record(schema.MOVE_ENTRY, *row(target, seq, deliveries, "expired", 2.5))
        self.entries[target, seq] = deliveries
        self.remove(qid, seq)

    def remember(self):
        message_id = self.data.draw(st.sampled_from(IDS))
        expires = self.data.draw(st.integers(0, 9))
        self.record(schema.REMEMBER_ID, message_id, float(expires))

    def save_queue(self):
        qid = self.data.draw(st.sampled_from(QIDS))
        self.record(schema.SAVE_QUEUE, qid, f"c{qid}", "e", 0, '{"a":1}', 5)

    def step(self):
        moves = [self.publish, self.remember, self.save_queue]
        if self.entries:
            moves += [self.deliver, self.deliver, self.remove, self.remove, self.move]
        self.data.draw(st.sampled_from(moves))()


class CoalesceTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.data(), st.integers(0, 12), st.integers(1, 40))
    def test_same_end_result(self, data, before, steps):
        """Whatever valid changes a batch holds, coalesced they leave the same rows."""
        broker = _Broker(data)
        one_by_one, coalesced = database(), database()
        # Rows already in the file before the batch
        for _ in range(before):
            broker.step()
        for connection in (one_by_one, coalesced):
            for sql, params in broker.ops:
                connection.execute(sql, params)
        broker.ops = []
        for _ in range(steps):
            broker.step()
        for sql, params in broker.ops:
            one_by_one.execute(sql, params)
        for sql, rows in coalesce(broker.ops):
            coalesced.executemany(sql, rows)
        self.assertEqual(contents(coalesced), contents(one_by_one))

    def test_published_and_acknowledged(self):
        """A message published, delivered and acknowledged within the batch is not written."""
        ops = [
            (schema.ADD_ENTRY, row(1, 1, 0)),
            (schema.DELIVERED, (1, 1, 1)),
            (schema.REMOVE_ENTRY, (1, 1)),
        ]
        self.assertEqual(coalesce(ops), [])

    def test_one_statement_per_kind(self):
        """Many messages published and delivered become one executemany per kind."""
        ops = []
        for seq in range(1, 101):
            ops.append((schema.ADD_ENTRY, row(1, seq, 0)))
            ops.append((schema.DELIVERED, (1, 1, seq)))
            ops.append((schema.REMOVE_ENTRY, (2, seq)))
        statements = coalesce(ops)
        self.assertEqual(
            [(sql, len(rows)) for sql, rows in statements],
            [(schema.ADD_ENTRY, 100), (schema.REMOVE_ENTRY, 100)],
        )
        self.assertEqual(tuple(statements[0][1][0]), row(1, 1, 1))
