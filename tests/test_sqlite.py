"""
What only the SQLite store does: group commit on a writer, confirmations
after the commit, recovery from a failing disk, refusing files it must not
open, and keeping the file from growing.
"""

import json
import os
import sqlite3
import tempfile

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.frames import encode_json
from caps.protocol import BrokerFactory
from caps.store import StoreError
from caps.store.group import RETRY_DELAY
from caps.store.sqlite import SQLiteStore

from .test_store import synchronous


class HeldWrites:
    """
    A writer that holds each write (or read) until the test releases it.
    """

    def __init__(self):
        self.held = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.held.append((f, args, d))
        return d

    def release(self):
        f, args, d = self.held.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


class _Files:
    def setUp(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-sqlite-")
        self.addCleanup(scratch.cleanup)
        self.dir = scratch.name
        self.path = os.path.join(self.dir, "caps.sqlite3")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def open(self, runner=synchronous, path=None):
        store = SQLiteStore.open(path or self.path, self.clock, runner=runner)
        self.addCleanup(store.close)
        return store


def line(obj):
    return json.dumps(obj).encode() + b"\n"


class GroupCommitTests(_Files, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.writes = HeldWrites()
        self.store = self.open(self.writes)
        self.broker = Broker(self.clock, store=self.store)
        self.factory = BrokerFactory(self.broker)

    def connect(self):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(transport)
        return protocol, transport

    def frames(self, transport):
        data = transport.value()
        transport.clear()
        return [json.loads(x) for x in data.splitlines()]

    def test_ok_after_commit(self):
        """A publish is confirmed only once its transaction is committed."""
        protocol, transport = self.connect()
        protocol.dataReceived(line({"event": "delivered", "to": "acme", "id": 1}))
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0)
        self.assertEqual(len(self.writes.held), 1)
        self.assertEqual(transport.value(), b"")
        self.writes.release()
        [ok] = self.frames(transport)
        self.assertEqual((ok["event"], ok["id"], ok["payload"]["queues"]), ("ok", 1, 1))
        count = sqlite3.connect(self.path).execute("SELECT count(*) FROM entries")
        self.assertEqual(count.fetchone()[0], 1)

    def test_replies_in_order(self):
        """A pong for a later frame waits behind an ok still waiting for the disk."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            line({"event": "delivered", "to": "acme", "id": 1})
            + line({"event": "ping", "id": 2})
            + b"junk\n"
        )
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0)
        self.writes.release()
        self.assertEqual(
            [(f["event"], f.get("id")) for f in self.frames(transport)],
            [("ok", 1), ("pong", 2), ("error", None)],
        )

    def test_deliveries_do_not_wait(self):
        """A consumer gets a message at once; only the publisher's ok waits for the disk."""
        consumer, consumer_out = self.connect()
        consumer.dataReceived(
            line(
                {
                    "event": "subscribe",
                    "payload": {"clientId": "acme", "event": "delivered"},
                }
            )
        )
        publisher, publisher_out = self.connect()
        publisher.dataReceived(line({"event": "delivered", "to": "acme", "id": 1}))
        self.assertEqual(len(self.frames(consumer_out)), 1)
        self.assertEqual(publisher_out.value(), b"")

    def test_one_transaction_per_pass(self):
        """Everything received in one reactor pass is written in one transaction; the next batch waits its turn."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"".join(line({"event": "e", "to": "q", "id": n}) for n in range(50))
        )
        self.clock.advance(0)
        self.assertEqual(len(self.writes.held), 1)
        protocol.dataReceived(
            b"".join(line({"event": "e", "to": "q", "id": n}) for n in range(50, 60))
        )
        self.clock.advance(0)
        self.assertEqual(len(self.writes.held), 1)
        self.writes.release()
        self.assertEqual([f["id"] for f in self.frames(transport)], list(range(50)))
        # The second batch went to the writer as soon as the first was done.
        self.assertEqual(len(self.writes.held), 1)
        self.writes.release()
        self.assertEqual([f["id"] for f in self.frames(transport)], list(range(50, 60)))
        self.assertIsNone(self.store.flushed())


class FailureTests(_Files, SynchronousTestCase):
    def test_disk_full(self):
        """When the disk fills, publishes get store-unavailable; once it frees, the broker recovers and nothing confirmed is lost."""
        store = self.open()
        broker = Broker(self.clock, store=store)
        factory = BrokerFactory(broker)
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(transport)

        def publish(n):
            protocol.dataReceived(
                line(
                    {
                        "event": "e",
                        "to": "q",
                        "id": n,
                        "messageId": f"m{n}",
                        "payload": {"pad": "x" * 3000},
                    }
                )
            )

        publish(0)
        self.clock.advance(0)
        pages = store._connection.execute("PRAGMA page_count").fetchone()[0]
        store._connection.execute(f"PRAGMA max_page_count = {pages + 3}")
        for n in range(1, 6):
            publish(n)
        self.clock.advance(0)
        self.flushLoggedErrors(sqlite3.OperationalError)
        replies = [json.loads(x) for x in transport.value().splitlines()]
        transport.clear()
        self.assertEqual(replies[0]["event"], "ok")
        self.assertEqual(
            {r["payload"].get("code") for r in replies[1:]}, {"store-unavailable"}
        )
        self.assertFalse(store.available)
        # New changes are refused at once while the store is failing.
        publish(6)
        [refused] = [json.loads(x) for x in transport.value().splitlines()]
        transport.clear()
        self.assertEqual(
            (refused["id"], refused["payload"]["code"]), (6, "store-unavailable")
        )
        # Room again: the retry writes the held batch.
        store._connection.execute("PRAGMA max_page_count = 1073741823")
        self.clock.advance(RETRY_DELAY)
        self.assertTrue(store.available)
        # The publisher retries: the first attempt made it after all.
        publish(3)
        self.clock.advance(0)
        [again] = [json.loads(x) for x in transport.value().splitlines()]
        self.assertEqual(
            again["payload"], {"messageId": "m3", "queues": 0, "duplicate": True}
        )
        ids = [
            r[0]
            for r in sqlite3.connect(self.path).execute(
                "SELECT id FROM entries ORDER BY seq"
            )
        ]
        self.assertEqual(ids, [f"m{n}" for n in range(6)])


class _VacuumFails:
    """
    A connection whose housekeeping after a commit fails, as on a full disk.
    """

    def __init__(self, connection):
        self._connection = connection

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def execute(self, sql, *args):
        if sql.startswith("PRAGMA freelist_count"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.execute(sql, *args)


class HousekeepingTests(_Files, SynchronousTestCase):
    def test_failed_vacuum_is_not_a_failed_write(self):
        """A failure after the commit (giving space back) neither loses nor repeats the batch."""
        store = self.open()
        store._connection = _VacuumFails(store._connection)
        broker = Broker(self.clock, store=store)
        broker.publish("e", {}, b"{}", ("q",), "m1")
        self.clock.advance(0)
        self.assertTrue(store.available)
        self.assertIsNone(store.flushed())
        broker.publish("e", {}, b"{}", ("q",), "m2")
        self.clock.advance(0)
        self.assertTrue(store.available)
        ids = [
            r[0] for r in sqlite3.connect(self.path).execute("SELECT id FROM entries")
        ]
        self.assertEqual(ids, ["m1", "m2"])


class OpenTests(_Files, SynchronousTestCase):
    def assertRefused(self, path, *words):
        e = self.assertRaises(
            StoreError, SQLiteStore.open, path, self.clock, runner=synchronous
        )
        message = str(e)
        self.assertTrue(message.startswith("caps-broker: "), message)
        self.assertNotIn("\n", message)
        self.assertNotIn("Traceback", message)
        for word in words:
            self.assertIn(word, message)
        return message

    def test_creates_schema(self):
        """A new file gets CAPS's application id, the current schema version, WAL and incremental vacuum."""
        self.open()
        db = sqlite3.connect(self.path)
        self.assertEqual(db.execute("PRAGMA application_id").fetchone()[0], 0x43415053)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 3)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("PRAGMA auto_vacuum").fetchone()[0], 2)

    def test_foreign_database(self):
        """Another program's SQLite file is refused, untouched."""
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE invoices (n INTEGER)")
        db.commit()
        db.close()
        self.assertRefused(self.path, "not a CAPS store")
        tables = (
            sqlite3.connect(self.path)
            .execute("SELECT name FROM sqlite_master")
            .fetchall()
        )
        self.assertEqual(tables, [("invoices",)])

    def test_newer_schema(self):
        """A store written by a newer CAPS is refused with both versions named."""
        self.open().close()
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA user_version = 7")
        db.close()
        self.assertRefused(self.path, "newer CAPS", "schema 7", "schema 3")

    def test_not_a_database(self):
        """A file that is not SQLite is refused."""
        with open(self.path, "w") as f:
            f.write("these are not the queues you are looking for\n" * 100)
        self.assertRefused(self.path, "cannot open store")

    def test_unusable_paths(self):
        """A missing directory or a directory in place of the file is refused."""
        self.assertRefused(
            os.path.join(self.dir, "missing", "caps.sqlite3"), "cannot open store"
        )
        os.mkdir(os.path.join(self.dir, "adir"))
        self.assertRefused(os.path.join(self.dir, "adir"), "cannot open store")

    def test_one_broker_per_file(self):
        """A second broker cannot open a store in use, and is told which process has it."""
        first = self.open()
        self.assertRefused(self.path, "in use by another broker", f"pid {os.getpid()}")
        self.successResultOf(first.close())
        self.open()


SCHEMA_1 = """
CREATE TABLE queues (qid INTEGER PRIMARY KEY, client_id TEXT NOT NULL,
    event TEXT NOT NULL, subscribed INTEGER NOT NULL, filter TEXT,
    UNIQUE (client_id, event));
CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL, payload BLOB NOT NULL, time REAL NOT NULL);
CREATE TABLE entries (qid INTEGER NOT NULL, seq INTEGER NOT NULL,
    deliveries INTEGER NOT NULL, PRIMARY KEY (qid, seq)) WITHOUT ROWID;
CREATE TABLE dedupe (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX dedupe_expires ON dedupe (expires);
INSERT INTO queues VALUES (1, 'acme', 'delivered', 1, '{"store":"acme"}');
INSERT INTO messages VALUES (1, 'd1', 'delivered', CAST('{"n":1}' AS BLOB), 1700000000.0);
INSERT INTO entries VALUES (1, 1, 2);
PRAGMA application_id = 1128353875;
PRAGMA user_version = 1;
"""


class MigrationTests(_Files, SynchronousTestCase):
    def test_schema_1(self):
        """A store written by CAPS 0.2 (schema 1) is brought up to date and keeps everything."""
        db = sqlite3.connect(self.path)
        db.executescript(SCHEMA_1)
        db.close()
        broker = Broker(self.clock, store=self.open())
        self.addCleanup(broker.stop)
        queue = broker.queue("acme", "delivered")
        self.assertEqual((queue.filter, queue.max_length), ({"store": "acme"}, None))
        [entry] = queue.entries()
        self.assertEqual(
            (entry.message.id, entry.deliveries, entry.dead), ("d1", 2, None)
        )
        db = sqlite3.connect(self.path)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 3)

    def test_schema_2(self):
        """A store written by CAPS 0.3 (schema 2: messages apart from entries) keeps every message in every queue."""
        db = sqlite3.connect(self.path)
        db.executescript(SCHEMA_2)
        db.close()
        broker = Broker(self.clock, store=self.open())
        self.addCleanup(broker.stop)
        self.assertEqual(broker._state.seq, 3)
        rows = {
            key: sorted(
                (e.message.seq, e.message.id, e.message.payload, e.deliveries, e.dead)
                for e in broker.queue(*key).entries()
            )
            for key in [
                ("acme", "delivered"),
                ("log", "delivered"),
                ("acme", "delivered.dead"),
            ]
        }
        self.assertEqual(
            rows,
            {
                ("acme", "delivered"): [(1, "d1", b'{"n":1}', 2, None)],
                ("log", "delivered"): [
                    (1, "d1", b'{"n":1}', 0, None),
                    (3, "d3", b'{"n":3}', 0, None),
                ],
                ("acme", "delivered.dead"): [
                    (2, "d2", b'{"n":2}', 20, ("max-deliveries", 1700000100.0))
                ],
            },
        )
        db = sqlite3.connect(self.path)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 3)
        tables = {
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        self.assertEqual(tables, {"queues", "entries", "dedupe"})


SCHEMA_2 = """
CREATE TABLE queues (qid INTEGER PRIMARY KEY, client_id TEXT NOT NULL,
    event TEXT NOT NULL, subscribed INTEGER NOT NULL, filter TEXT,
    max_length INTEGER, UNIQUE (client_id, event));
CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL, payload BLOB NOT NULL, time REAL NOT NULL, expires REAL);
CREATE TABLE entries (qid INTEGER NOT NULL, seq INTEGER NOT NULL,
    deliveries INTEGER NOT NULL, dead_reason TEXT, dead_time REAL,
    PRIMARY KEY (qid, seq)) WITHOUT ROWID;
CREATE TABLE dedupe (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX dedupe_expires ON dedupe (expires);
INSERT INTO queues VALUES (1, 'acme', 'delivered', 1, NULL, NULL);
INSERT INTO queues VALUES (2, 'log', 'delivered', 1, NULL, NULL);
INSERT INTO queues VALUES (3, 'acme', 'delivered.dead', 0, NULL, NULL);
INSERT INTO messages VALUES (1, 'd1', 'delivered', CAST('{"n":1}' AS BLOB), 1700000000.0, NULL);
INSERT INTO messages VALUES (2, 'd2', 'delivered', CAST('{"n":2}' AS BLOB), 1700000001.0, NULL);
INSERT INTO messages VALUES (3, 'd3', 'delivered', CAST('{"n":3}' AS BLOB), 1700000002.0, NULL);
INSERT INTO entries VALUES (1, 1, 2, NULL, NULL);
INSERT INTO entries VALUES (2, 1, 0, NULL, NULL);
INSERT INTO entries VALUES (3, 2, 20, 'max-deliveries', 1700000100.0);
INSERT INTO entries VALUES (2, 3, 0, NULL, NULL);
PRAGMA application_id = 1128353875;
PRAGMA user_version = 2;
"""


class SizeTests(_Files, SynchronousTestCase):
    def file_size(self):
        return sum(
            os.path.getsize(self.path + suffix)
            for suffix in ("", "-wal")
            if os.path.exists(self.path + suffix)
        )

    def test_steady_state(self):
        """Publishing and acknowledging for a long time leaves the files the same size once the log has filled."""
        store = self.open()
        broker = Broker(self.clock, store=store)
        sizes = []
        for _ in range(60):
            ids = [
                broker.publish("e", {}, encode_json({"pad": "x" * 200}), ("q",))[
                    "messageId"
                ]
                for _ in range(250)
            ]
            self.clock.advance(0)
            for message_id in ids:
                broker.received("q", "e", message_id)
            self.clock.advance(0)
            sizes.append(self.file_size())
        # The write-ahead log fills up to its checkpoint size (about 4 MB)
        # in the first 25 rounds, then is reused.
        self.assertLess(sizes[30], 8 * 1024 * 1024)
        self.assertLessEqual(sizes[-1], sizes[30] * 1.05)

    def test_space_given_back(self):
        """After a large backlog drains, the file gives most of its space back."""
        store = self.open()
        broker = Broker(self.clock, store=store)
        ids = [
            broker.publish("e", {}, encode_json({"pad": "x" * 500}), ("q",))[
                "messageId"
            ]
            for _ in range(20000)
        ]
        self.clock.advance(0)
        full = store._connection.execute("PRAGMA page_count").fetchone()[0]
        for message_id in ids:
            broker.received("q", "e", message_id)
        self.clock.advance(0)
        empty = store._connection.execute("PRAGMA page_count").fetchone()[0]
        self.assertLess(empty, full / 3)


class _Sink:
    def deliver(self, entry):
        pass


class BacklogTests(_Files, SynchronousTestCase):
    def test_large_backlog_survives_restart(self):
        """A 100,000-message backlog survives a restart and drains in order."""
        store = self.open()
        broker = Broker(self.clock, store=store)
        for n in range(100_000):
            broker.publish("e", {}, encode_json({"n": n}), ("q",))
            if n % 5000 == 0:
                self.clock.advance(0)
        self.clock.advance(0)
        self.successResultOf(store.close())
        store = self.open()
        broker = Broker(self.clock, store=store, max_unacked=100_000)
        # Only the store's window of it is in memory after the restart.
        queue = broker.queue("q", "e")
        self.assertEqual((queue.in_memory, len(queue)), (store.window, 100_000))
        sink = _Counting()
        broker.connect(sink)
        done = broker.get_all(sink, "q", "e")
        # The rest is read back as it goes, a reactor turn at a time.
        for _ in range(1000):
            if done.called:
                break
            self.clock.advance(0)
        self.assertEqual(self.successResultOf(done)["count"], 100_000)
        self.assertEqual(sink.ns, list(range(100_000)))


class _Counting:
    def __init__(self):
        self.ns = []

    def deliver(self, entry):
        self.ns.append(json.loads(entry.message.payload)["n"])
