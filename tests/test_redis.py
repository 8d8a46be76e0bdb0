"""
What only the Redis store does: its key layout, one broker per database
(the lock), refusing databases it must not use, passwords kept out of
logs, and what --redis-durable asks of the server.
"""

import os
from unittest import skipIf

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.frames import encode_json
from caps.store import StoreError, StoreUnavailable, open_store
from caps.store.group import RETRY_DELAY
from caps.store.redis import LAYOUT_KEY, LOCK_KEY, LOCK_RENEW, RedisStore
from caps.store.redisconnect import PASSWORD_ENV, shown

from . import redisserver
from .test_store import synchronous


class ShownTests(SynchronousTestCase):
    def test_password_hidden(self):
        """A URL's password never reaches a log or an error; the rest of it does."""
        self.assertEqual(
            shown("redis://:s3cret@db.example:6380/2"), "redis://:***@db.example:6380/2"
        )
        self.assertEqual(
            shown("rediss://caps:s3cret@[::1]:6380/0"), "rediss://caps:***@[::1]:6380/0"
        )
        self.assertEqual(shown("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0")


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisStoreTests(redisserver.OnSharedServer, SynchronousTestCase):
    def open(self, url=None, **options):
        store = RedisStore.open(
            url or self.server.url, self.clock, runner=synchronous, **options
        )
        self.addCleanup(store.close)
        return store

    def publish(self, broker, n, to="driver"):
        payload = {"n": n}
        return broker.publish("pickup", payload, encode_json(payload), (to,))

    def test_layout(self):
        """A queue's keys carry its hash tag, and hold its messages in order with their delivery counts."""
        store = self.open()
        broker = Broker(self.clock, store=store)
        self.addCleanup(broker.stop)
        for n in range(3):
            self.publish(broker, n)
        self.clock.advance(0)
        qid = broker.queue("driver", "pickup").qid
        tag = f"caps:{{q{qid}}}"
        self.assertEqual(self.redis.get(LAYOUT_KEY), b"1")
        self.assertEqual(
            [int(s) for s in self.redis.zrange(f"{tag}:seqs", 0, -1)], [1, 2, 3]
        )
        row = self.redis.hget(f"{tag}:rows", 2)
        self.assertEqual(row.partition(b"\n")[2], b'{"n":1}')
        self.assertEqual(len(self.redis.hgetall(f"{tag}:ids")), 3)
        self.assertIn(str(qid).encode(), self.redis.hgetall("caps:queues"))

    def test_acknowledged_leaves_no_keys(self):
        """Once every message is acknowledged, a queue leaves nothing of them in Redis."""
        store = self.open()
        broker = Broker(self.clock, store=store)
        self.addCleanup(broker.stop)
        ids = [self.publish(broker, n)["messageId"] for n in range(3)]
        self.clock.advance(0)
        for message_id in ids:
            broker.received("driver", "pickup", message_id)
        self.clock.advance(0)
        tag = f"caps:{{q{broker.queue('driver', 'pickup').qid}}}"
        self.assertEqual(self.redis.keys(tag + "*"), [])

    def test_one_broker_per_database(self):
        """A second broker cannot open a database another broker holds; it says who holds it."""
        self.open()
        e = self.assertRaises(
            StoreError, RedisStore.open, self.server.url, self.clock, lock_wait=0
        )
        self.assertIn("in use by another broker", str(e))
        self.assertIn(f"pid {os.getpid()}", str(e))

    def test_lock_of_a_dead_broker_expires(self):
        """A broker that died without closing lets go of the database when its lock expires; the next one waits for that."""
        first = self.open()
        first._renewing.stop()
        self.redis.pexpire(LOCK_KEY, 300)
        second = self.open(lock_wait=5)
        self.assertTrue(second.available)

    def test_closed_store_lets_go(self):
        """Closing the store gives the lock back at once."""
        store = RedisStore.open(self.server.url, self.clock, runner=synchronous)
        self.successResultOf(store.close())
        self.assertIsNone(self.redis.get(LOCK_KEY))
        self.open(lock_wait=0)

    def test_lost_lock_stops_writing(self):
        """A broker whose lock another broker took stops writing and refuses changes, rather than write over it."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = self.open()
        broker = Broker(self.clock, store=store)
        self.addCleanup(broker.stop)
        self.publish(broker, 0)
        self.clock.advance(0)
        self.redis.set(LOCK_KEY, "another broker")
        self.clock.advance(LOCK_RENEW)
        self.assertFalse(store.available)
        self.assertRaises(StoreUnavailable, self.publish, broker, 1)
        self.assertEqual(self.redis.get(LOCK_KEY), b"another broker")
        self.assertTrue(
            any(e.get("log_level") == LogLevel.critical for e in events), events
        )

    def test_answer_lost(self):
        """A batch Redis ran but whose answer was lost (Redis killed just after) is written again, not taken for lost data."""
        import redis

        store = self.open()
        broker = Broker(self.clock, store=store)
        self.addCleanup(broker.stop)
        self.publish(broker, 0)
        self.clock.advance(0)
        ran = store._scripts.batch

        def answer_lost(*args, **kwargs):
            ran(*args, **kwargs)
            raise redis.ConnectionError("Connection closed by server.")

        store._scripts.batch = answer_lost
        self.publish(broker, 1)
        self.clock.advance(0)
        self.assertFalse(store.available)
        store._scripts.batch = ran
        self.clock.advance(RETRY_DELAY)
        self.assertTrue(store.available)
        self.publish(broker, 2)
        self.clock.advance(0)
        self.assertIsNone(store.flushed())
        self.assertEqual(len(self.flushLoggedErrors(redis.ConnectionError)), 1)
        tag = f"caps:{{q{broker.queue('driver', 'pickup').qid}}}"
        self.assertEqual(len(self.redis.zrange(f"{tag}:seqs", 0, -1)), 3)

    def test_foreign_database(self):
        """A database holding keys that are not a CAPS store's is refused, untouched."""
        self.redis.set("someone-elses", "data")
        e = self.assertRaises(StoreError, RedisStore.open, self.server.url, self.clock)
        self.assertIn("not a CAPS store", str(e))
        self.assertEqual(self.redis.keys("*"), [b"someone-elses"])

    def test_newer_layout(self):
        """A store written by a newer CAPS is refused with both versions named."""
        self.redis.set(LAYOUT_KEY, 99)
        e = self.assertRaises(StoreError, RedisStore.open, self.server.url, self.clock)
        self.assertIn("layout 99", str(e))

    def test_unreachable(self):
        """A Redis nobody answers at is a one-line error naming the URL."""
        url = f"redis://127.0.0.1:{redisserver.free_port()}/0"
        e = self.assertRaises(StoreError, open_store, url, self.clock)
        self.assertIn(f"cannot open store {url}", str(e))
        self.assertNotIn("\n", str(e))

    def test_not_a_redis_url(self):
        """A description that is not a Redis URL is refused."""
        self.assertRaises(StoreError, RedisStore.open, "http://x/", self.clock)

    def test_durable_on_redis_7_0(self):
        """--redis-durable takes a server that syncs every write (appendfsync always) and finds it has no replica."""
        store = self.open(durable=True)
        if store.durable == "waitaof":
            self.skipTest("this Redis has WAITAOF")
        self.assertEqual((store.durable, store.replicas), ("always", 0))
        broker = Broker(self.clock, store=store)
        self.addCleanup(broker.stop)
        self.publish(broker, 0)
        self.clock.advance(0)
        self.assertIsNone(store.flushed())


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class ServerSettingsTests(SynchronousTestCase):
    """
    Servers of their own, set up as the test needs.
    """

    def server(self, *args):
        server = redisserver.RedisServer(*args).start()
        self.addCleanup(server.stop)
        return server

    def test_durable_needs_sync(self):
        """--redis-durable refuses a server that would answer before syncing."""
        server = self.server("--appendfsync", "everysec")
        try:
            store = RedisStore.open(server.url, Clock(), durable=True)
        except StoreError as e:
            self.assertIn("appendfsync always", str(e))
        else:
            # Redis 7.2 and later wait for the sync with WAITAOF instead.
            self.addCleanup(store.close)
            self.assertEqual(store.durable, "waitaof")

    def test_durable_needs_aof(self):
        """--redis-durable refuses a server without an append-only file."""
        server = self.server("--appendonly", "no")
        e = self.assertRaises(
            StoreError, RedisStore.open, server.url, Clock(), durable=True
        )
        self.assertIn("appendonly yes", str(e))

    def test_password(self):
        """The password comes from the URL or $CAPS_REDIS_PASSWORD, and a wrong one is refused without being shown."""
        server = self.server("--requirepass", "s3cret")
        port = server.port
        clock = Clock()
        store = RedisStore.open(f"redis://:s3cret@127.0.0.1:{port}/0", clock)
        self.assertEqual(store.name, f"redis://:***@127.0.0.1:{port}/0")
        self.successResultOf(store.close())
        self.patch(os, "environ", {**os.environ, PASSWORD_ENV: "s3cret"})
        store = RedisStore.open(f"redis://127.0.0.1:{port}/0", clock)
        self.successResultOf(store.close())
        e = self.assertRaises(
            StoreError, RedisStore.open, f"redis://:wrong@127.0.0.1:{port}/0", clock
        )
        self.assertNotIn("wrong", str(e))
        self.assertIn(":***@", str(e))
