"""
A Redis store across a Redis outage long enough for its lock to expire
(and perhaps for another broker to take the database): the broker must not
write to it any more, not even the changes it kept to write again once
Redis is back, and must not confirm what it no longer writes.
"""

import json
from unittest import skipIf

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.frames import encode_json
from caps.store import StoreUnavailable
from caps.store.group import RETRY_DELAY
from caps.store.redis import LOCK_KEY, LOCK_RENEW, RedisStore

from . import redisserver
from .test_store import synchronous

START = 1_700_000_000


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class LostLockTests(SynchronousTestCase):
    """
    A broker ("first") publishes while Redis is down: its write fails and is
    kept, to be written again.  Redis comes back after the first broker's
    lock expired (deleted here), and, in most tests, a second broker opens
    the database and publishes: its message takes the same sequence number
    as the kept one.
    """

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.server = redisserver.RedisServer().start()
        self.addCleanup(self.server.stop)
        self.clock = Clock()
        self.clock.advance(START)
        self.first = self.broker(self.clock)

    def broker(self, clock):
        store = RedisStore.open(self.server.url, clock, runner=synchronous)
        self.addCleanup(store.close)
        broker = Broker(clock, store=store)
        self.addCleanup(broker.stop)
        return broker

    def lock_lost(self):
        """
        Whether a broker logged that another broker holds its lock.
        """
        return any(
            e.get("log_level") == LogLevel.critical
            and "another broker holds its lock" in e.get("log_format", "")
            for e in self.events
        )

    def publish(self, broker, n):
        payload = {"n": n}
        broker.publish("pickup", payload, encode_json(payload), ("driver",))
        broker.clock.advance(0)

    def outage(self, down=0, other=True):
        """
        The first broker publishes n=1 while Redis is down, which stays down
        C{down} more seconds; Redis comes back without its lock; with
        C{other}, the second broker opens it and publishes n=100.
        """
        import redis

        self.second = None
        self.server.kill()
        self.publish(self.first, 1)
        self.assertFalse(self.first.store.available)
        self.clock.advance(down)
        self.assertEqual(len(self.flushLoggedErrors(redis.ConnectionError)), 1)
        self.server.restart()
        with self.server.client() as client:
            client.delete(LOCK_KEY)
        if other:
            self.second = self.broker(Clock())
            self.publish(self.second, 100)

    def stored(self):
        """
        The n of every message the database holds, as a broker that opens
        it next finds them.
        """
        for broker in (self.first, self.second):
            if broker is not None:
                broker.stop()
                self.successResultOf(broker.store.close())
        with self.server.client() as client:
            # The first broker's, if it took it again.
            client.delete(LOCK_KEY)
        store = RedisStore.open(self.server.url, Clock(), runner=synchronous)
        self.addCleanup(store.close)
        queue = store.load().queues["driver", "pickup"]
        return [json.loads(e.message.payload)["n"] for e in queue.entries()]

    def test_lost_lock_keeps_kept_writes(self):
        """Once it knows another broker holds its lock, a broker does not write the changes it kept from a failed write over that broker's."""
        self.publish(self.first, 0)
        self.outage()
        # The renewal finds the lock gone first; the retry comes after it.
        self.clock.advance(RETRY_DELAY)
        self.assertTrue(self.lock_lost())
        self.assertEqual(self.stored(), [0, 100])

    def test_expired_lock_taken_again(self):
        """After an outage that outlasted its lock, with no other broker meanwhile, a broker takes its lock again and writes what it kept and what comes after."""
        self.publish(self.first, 0)
        self.outage(other=False)
        # The retry finds the lock expired and fails again; the renewal
        # takes it back (nobody took it meanwhile); the next retry writes.
        self.clock.advance(RETRY_DELAY)
        self.clock.advance(RETRY_DELAY)
        self.assertFalse(self.lock_lost())
        self.assertTrue(self.first.store.available)
        self.publish(self.first, 2)
        self.assertIsNone(self.first.store.flushed())
        self.assertEqual(self.stored(), [0, 1, 2])
        self.flushLoggedErrors(OSError)

    def test_lost_lock_refuses_changes(self):
        """Once another broker has taken its lock, a broker refuses publishes and confirms none it does not write."""
        self.publish(self.first, 0)
        self.outage()
        self.clock.advance(RETRY_DELAY)
        self.assertTrue(self.lock_lost())
        self.assertFalse(self.first.store.available)
        self.assertRaises(StoreUnavailable, self.publish, self.first, 2)
        self.clock.advance(RETRY_DELAY * 5)
        self.assertFalse(self.first.store.available)
        self.assertEqual(self.stored(), [0, 100])

    def test_write_after_outage_checks_lock(self):
        """A broker whose lock expired while Redis was down does not write the changes it kept, even when it tries before its renewal finds the lock gone."""
        self.publish(self.first, 0)
        # A write fails half-way between two renewals; the next renewal
        # fails too (Redis is still down), and the retry comes before the
        # renewal after it.
        self.clock.advance(LOCK_RENEW / 2)
        self.outage(down=LOCK_RENEW / 2)
        self.clock.advance(RETRY_DELAY / 2)
        self.assertEqual(self.stored(), [0, 100])
