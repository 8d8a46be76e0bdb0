"""
The Redis store behind Redis Sentinel (C{redis+sentinel://}): a primary, a
replica and three Sentinels, all started by the test on loopback.  When
the primary dies, the Sentinels promote the replica and the store goes on
writing to it; with C{--redis-durable} every confirmed message was on the
replica before its confirmation, so none is lost by the failover.
"""

import json
from unittest import skipIf

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.frames import encode_json
from caps.store import StoreError
from caps.store.redis import RedisStore

from . import redisserver
from .test_store import synchronous

SERVICE = "caps"
# Seconds to wait for replication to start, or for a failover to finish.
WAIT = 30.0


def sentinel_config(port):
    return (
        f"sentinel monitor {SERVICE} {redisserver.HOST} {port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} 500\n"
        f"sentinel failover-timeout {SERVICE} 3000\n"
    )


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SentinelTests(SynchronousTestCase):
    def start(self, *args, **options):
        server = redisserver.RedisServer(*args, **options).start()
        self.addCleanup(server.stop)
        return server

    def setUp(self):
        self.primary = self.start(*redisserver.PRIMARY)
        self.replica = self.start("--replicaof", redisserver.HOST, self.primary.port)
        self.assertEqual(redisserver.replicated(self.primary, WAIT), 1)
        self.sentinels = [
            self.start(sentinel=sentinel_config(self.primary.port)) for _ in range(3)
        ]
        self.url = (
            "redis+sentinel://"
            + ",".join(f"{redisserver.HOST}:{s.port}" for s in self.sentinels)
            + f"/{SERVICE}/0"
        )
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def publish(self, broker, n):
        payload = {"n": n}
        broker.publish("pickup", payload, encode_json(payload), ("driver",))
        self.clock.advance(0)

    def test_failover(self):
        """After the primary dies and the replica is promoted, the store writes to the new primary, and every message it confirmed is there."""
        store = RedisStore.open(self.url, self.clock, runner=synchronous, durable=True)
        self.addCleanup(store.close)
        self.assertEqual(store.replicas, 1, "waits for the replica")
        broker = Broker(self.clock, store=store)
        self.addCleanup(broker.stop)
        self.publish(broker, 0)
        self.assertIsNone(store.flushed())
        switched = redisserver.SentinelEvents(self.sentinels, "+switch-master")
        self.addCleanup(switched.close)
        self.primary.kill()
        # Every Sentinel announces the replica as the new primary.
        for event in switched.wait(WAIT):
            self.assertTrue(event.endswith(b" %d" % self.replica.port), event)
        # The write fails while the store still counts the replica that is
        # now the primary, and is tried again every second: by then it has
        # counted again, and the connection asks the Sentinels where the
        # primary is.
        self.publish(broker, 1)
        for _ in range(10):
            if store.flushed() is None:
                break
            self.clock.advance(1.0)
        self.assertIsNone(store.flushed())
        self.assertTrue(store.available)
        self.flushLoggedErrors()
        broker.stop()
        self.successResultOf(store.close())
        with self.replica.client() as new_primary:
            self.assertEqual(new_primary.info("replication")["role"], "master")
        reopened = RedisStore.open(self.url, Clock(), runner=synchronous)
        self.addCleanup(reopened.close)
        queue = reopened.load().queues["driver", "pickup"]
        found = [json.loads(e.message.payload)["n"] for e in queue.entries()]
        self.assertEqual(sorted(found), [0, 1])

    def test_bad_sentinel_url(self):
        """A redis+sentinel URL without a service, or with a bad address, is a one-line error."""
        for url in (
            f"redis+sentinel://{redisserver.HOST}:{self.sentinels[0].port}/",
            "redis+sentinel://nohost/caps",
        ):
            e = self.assertRaises(StoreError, RedisStore.open, url, self.clock)
            self.assertIn("bad Redis URL", str(e))
