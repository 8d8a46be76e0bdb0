"""
Review of the Redis store (issue 8, phase 1): bugs found, each shown by a
test that fails until it is fixed.
"""

import os
import signal
from unittest import skipIf

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.frames import encode_json
from caps.queue import Message, Queue
from caps.store import StoreUnavailable
from caps.store import redis as redis_store
from caps.store.redis import LOCK_KEY, LOCK_RENEW, RedisStore

from . import redisserver
from .helpers import RecordingConnection
from .test_paging import _OnRedis, _Paging
from .test_store import synchronous

START = 1_700_000_000


def _server(test, *args):
    server = redisserver.RedisServer(*args).start()
    test.addCleanup(server.stop)
    return server


def _publish(broker, to, n, message_id=None):
    payload = {"n": n}
    return broker.publish("e", payload, encode_json(payload), (to,), message_id)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class PasswordTests(SynchronousTestCase):
    def test_password_in_query_hidden(self):
        """A password given as ?password= (which redis-py takes) is kept out of the store's name, used in every log line."""
        server = _server(self, "--requirepass", "s3cret")
        url = f"redis://127.0.0.1:{server.port}/0?password=s3cret"
        store = RedisStore.open(url, Clock())
        self.addCleanup(store.close)
        self.assertNotIn("s3cret", store.name)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class LockTests(redisserver.OnSharedServer, SynchronousTestCase):
    def test_remove_by_id_checks_the_lock(self):
        """Acknowledging a message only Redis has does not delete it from a database another broker has taken."""
        store = RedisStore.open(self.server.url, self.clock, runner=synchronous)
        self.addCleanup(store.close)
        queue = Queue("q", "e", 1)
        store.queue_saved(queue)
        store.message_added(Message("m", "e", b"{}", 1, START, None), [queue])
        self.clock.advance(0)
        self.assertIsNone(store.flushed())
        # Another broker takes the database (this one was paused past its
        # lease); this one has not noticed yet.
        self.redis.set(LOCK_KEY, "another broker pid 1")
        d = store.remove_by_id(queue, "m")
        self.assertEqual(self.redis.zrange("caps:{q1}:seqs", 0, -1), [b"1"])
        self.failureResultOf(d)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SpilledDuplicateTests(_OnRedis, _Paging, SynchronousTestCase):
    def test_acknowledged_duplicate_in_the_tail(self):
        """Acknowledging a messageId held twice in the tail (published again after the dedupe window) deletes both copies, as with SQLite."""
        self.publish_duplicate_after_window()
        self.turn()
        done = self.broker.received("q", "e", "dup")
        self.turn()
        self.assertTrue(self.successResultOf(done)["deleted"])
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.assertEqual(self.consume(conn, 6), [0, 1, 2, 3, 6])


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class LostWritesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)

    def open(self, server):
        store = RedisStore.open(server.url, self.clock, runner=synchronous)
        broker = Broker(self.clock, store=store)
        return store, broker

    def test_confirmed_after_redis_came_back_survive(self):
        """A publish confirmed after Redis restarted from an older snapshot is still there after the broker restarts."""
        server = _server(self, "--appendonly", "no")
        store, broker = self.open(server)
        _publish(broker, "a", 1)
        self.clock.advance(0)
        with server.client() as client:
            client.save()
        # A queue created after the snapshot: Redis loses it when killed.
        _publish(broker, "b", 2)
        self.clock.advance(0)
        server.kill()
        server.restart()
        self.clock.advance(LOCK_RENEW)
        _publish(broker, "b", 3)
        waiting = store.flushed()
        outcome = []
        waiting.addBoth(outcome.append)
        self.clock.advance(0)
        confirmed = outcome == [None]
        # Redis has lost a transaction the broker wrote: it stops writing.
        self.assertFalse(confirmed)
        self.assertFalse(store.available)
        # The broker is killed: its lock is let go of by hand.
        broker.stop()
        if store._renewing.running:
            store._renewing.stop()
        store._client.close()
        with server.client() as client:
            client.delete(LOCK_KEY)
        store, broker = self.open(server)
        self.addCleanup(store.close)
        self.addCleanup(broker.stop)
        queue = broker.queue("b", "e")
        if confirmed:
            self.assertIsNotNone(queue, "a confirmed publish was lost")
            conn = RecordingConnection()
            broker.connect(conn)
            broker.subscribe(conn, "b", "e")
            self.assertIn(3, [d["payload"]["n"] for d in conn.take()])


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class DurableReplicaTests(SynchronousTestCase):
    def test_replica_joined_after_start(self):
        """--redis-durable waits for a replica that connected after the broker started, from its next count of replicas (every second)."""
        self.patch(redis_store, "DURABLE_TIMEOUT", 0.2)
        primary = _server(self, *redisserver.PRIMARY)
        clock = Clock()
        clock.advance(START)
        store = RedisStore.open(primary.url, clock, runner=synchronous, durable=True)
        self.addCleanup(store.close)
        replica = _server(self, "--replicaof", redisserver.HOST, primary.port)
        self.assertEqual(redisserver.replicated(primary), 1)
        # Not stopped while it writes its first AOF (its SIGTERM would be
        # refused at cleanup).
        redisserver.aof_rewritten(replica)
        # The store counts the primary's replicas every second.
        clock.advance(redis_store.LOCK_RENEW)
        # The replica stops taking anything (a hung machine).
        os.kill(replica.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, replica.pid, signal.SIGCONT)
        broker = Broker(clock, store=store)
        self.addCleanup(broker.stop)
        _publish(broker, "a", 1)
        waiting = store.flushed()
        clock.advance(0)
        self.failureResultOf(waiting, StoreUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
