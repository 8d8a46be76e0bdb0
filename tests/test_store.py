"""
The store contract: one suite, run against every store through the broker
that uses it.  A "restart" makes a new broker on the store as a restarted
process would find it: the same object for the memory store, the file
reopened for SQLite and Redis.
"""

import os
import tempfile
from unittest import skipIf

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from caps.broker import Broker
from caps.frames import encode_json
from caps.store import IStore
from caps.store.memory import MemoryStore
from caps.store.redis import LOCK_KEY, RedisStore
from caps.store.sqlite import SQLiteStore

from . import redisserver
from .helpers import RecordingConnection


def synchronous(f, *args):
    """
    Run a store write at once, on this thread.
    """
    return defer.maybeDeferred(f, *args)


class _StoreContract:
    """
    Mixed into one TestCase per store; C{open_store} and C{reopen_store}
    come from there.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = self.open_store()
        self.options = {}
        self.broker = Broker(self.clock, store=self.store)
        self.addCleanup(lambda: self.broker.stop())

    def settle(self):
        """
        Let the store write what is pending (one pass of the reactor).
        """
        self.clock.advance(0)
        self.assertIsNone(self.store.flushed())

    def restart(self):
        """
        The broker stops without warning (no disconnects, nothing
        acknowledged) and starts again on what its store kept.
        """
        self.settle()
        self.broker.stop()
        self.store = self.reopen_store(self.store)
        self.broker = Broker(self.clock, store=self.store, **self.options)

    def connect(self, name="conn"):
        conn = RecordingConnection(name)
        self.broker.connect(conn)
        return conn

    def publish(self, event, payload, to=(), message_id=None):
        return self.broker.publish(
            event, payload, encode_json(payload), tuple(to), message_id
        )["messageId"]

    def test_provides_interface(self):
        """The store provides IStore."""
        verifyObject(IStore, self.store)

    def test_empty(self):
        """A new store holds nothing, and has nothing to wait for."""
        self.settle()
        self.restart()
        self.assertEqual(
            self.successResultOf(self.broker.get_all(self.connect(), "a", "b"))[
                "count"
            ],
            0,
        )

    def test_messages_survive_in_order(self):
        """Queued messages come back after a restart, oldest first, with their payloads."""
        ids = [
            self.publish("delivered", {"n": n, "s": "é"}, to=["acme"]) for n in range(5)
        ]
        self.restart()
        conn = self.connect()
        self.broker.subscribe(conn, "acme", "delivered")
        self.assertEqual(conn.ids(), ids)
        self.assertEqual(
            [d["payload"] for d in conn.deliveries],
            [{"n": n, "s": "é"} for n in range(5)],
        )
        self.assertEqual({d["redelivered"] for d in conn.deliveries}, {False})

    def test_in_flight_come_back_redelivered(self):
        """Messages in flight at the crash are ready again, in place, flagged redelivered."""
        ids = [self.publish("pickup", {"n": n}, to=["driver"]) for n in range(4)]
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "driver", "pickup")
        self.broker.subscribe(b, "driver", "pickup")
        self.broker.received("driver", "pickup", ids[1])
        self.restart()
        conn = self.connect()
        self.broker.subscribe(conn, "driver", "pickup")
        self.assertEqual(conn.ids(), [ids[0], ids[2], ids[3]])
        self.assertEqual([d["deliveries"] for d in conn.deliveries], [2, 2, 2])
        self.assertEqual({d["redelivered"] for d in conn.deliveries}, {True})

    def test_acknowledged_stay_deleted(self):
        """An acknowledged message does not come back after a restart."""
        first = self.publish("delivered", {}, to=["acme"])
        second = self.publish("delivered", {}, to=["acme"])
        self.broker.received("acme", "delivered", first)
        self.restart()
        conn = self.connect()
        self.assertEqual(
            self.successResultOf(self.broker.get_all(conn, "acme", "delivered"))[
                "count"
            ],
            1,
        )
        self.assertEqual(conn.ids(), [second])

    def test_subscription_and_filter_survive(self):
        """A subscribed queue keeps routing by its filter after a restart."""
        self.broker.subscribe(self.connect(), "acme", "delivered", {"store": "acme"})
        self.restart()
        self.assertEqual(
            self.broker.publish("delivered", {"store": "acme"}, b'{"store":"acme"}')[
                "queues"
            ],
            1,
        )
        self.assertEqual(
            self.broker.publish("delivered", {"store": "x"}, b'{"store":"x"}')[
                "queues"
            ],
            0,
        )

    def test_filter_change_survives(self):
        """The latest subscribe's filter is the one kept."""
        conn = self.connect()
        self.broker.subscribe(conn, "acme", "delivered", {"store": "old"})
        self.broker.subscribe(conn, "acme", "delivered", {"store": "new"})
        self.restart()
        self.assertEqual(self.publish_unaddressed({"store": "new"}), 1)
        self.assertEqual(self.publish_unaddressed({"store": "old"}), 0)

    def publish_unaddressed(self, payload):
        return self.broker.publish("delivered", payload, encode_json(payload))["queues"]

    def test_addressed_queue_is_not_subscribed(self):
        """A queue created by addressing alone does not start routing after a restart."""
        self.publish("delivered", {}, to=["acme"])
        self.restart()
        self.assertEqual(self.publish_unaddressed({}), 0)

    def test_deleted_queue_stays_deleted(self):
        """A deleted queue and its messages are gone after a restart."""
        conn = self.connect()
        self.broker.subscribe(conn, "acme", "delivered")
        self.publish("delivered", {}, to=["acme"])
        self.broker.unsubscribe(conn, "acme", "delivered", delete=True)
        self.restart()
        self.assertIsNone(self.broker.queue("acme", "delivered"))
        self.assertEqual(self.publish_unaddressed({}), 0)

    def test_shared_message(self):
        """A message in two queues stays in the one not yet acknowledged."""
        mid = self.publish("delivered", {"x": 1}, to=["acme", "logger"])
        self.broker.received("acme", "delivered", mid)
        self.restart()
        logger, acme = self.connect("logger"), self.connect("acme")
        self.assertEqual(
            self.successResultOf(self.broker.get_all(logger, "logger", "delivered"))[
                "count"
            ],
            1,
        )
        self.assertEqual(
            self.successResultOf(self.broker.get_all(acme, "acme", "delivered"))[
                "count"
            ],
            0,
        )
        self.broker.received("logger", "delivered", mid)
        self.restart()
        self.assertEqual(
            self.successResultOf(
                self.broker.get_all(self.connect(), "logger", "delivered")
            )["count"],
            0,
        )

    def test_dedupe_survives(self):
        """A client's messageId is still a duplicate after a restart, until its window ends."""
        self.publish("delivered", {}, to=["acme"], message_id="d1")
        self.broker.received("acme", "delivered", "d1")
        self.publish("delivered", {}, to=["acme"], message_id="still-queued")
        self.restart()
        again = self.broker.publish("delivered", {}, b"{}", ("acme",), "d1")
        self.assertTrue(again.get("duplicate"))
        self.clock.advance(601)
        self.restart()
        self.assertFalse(
            self.broker.publish("delivered", {}, b"{}", ("acme",), "d1").get(
                "duplicate"
            )
        )
        queued = self.broker.publish("delivered", {}, b"{}", ("acme",), "still-queued")
        self.assertTrue(queued.get("duplicate"))

    def test_new_messages_after_old(self):
        """Messages published after a restart queue behind the ones kept, with fresh ids."""
        old = [self.publish("delivered", {"n": n}, to=["acme"]) for n in range(3)]
        self.restart()
        new = [self.publish("delivered", {"n": n}, to=["acme"]) for n in range(3, 5)]
        self.assertEqual(len(set(old + new)), 5)
        conn = self.connect()
        self.successResultOf(self.broker.get_all(conn, "acme", "delivered"))
        self.assertEqual(conn.ids(), old + new)
        self.assertEqual([d["payload"]["n"] for d in conn.deliveries], list(range(5)))

    def test_dead_letters_survive(self):
        """Dead letters keep why and when they died, and their delivery count."""
        self.options = {"max_deliveries": 1}
        self.restart()
        conn = self.connect()
        self.broker.subscribe(conn, "driver", "pickup")
        mid = self.publish("pickup", {"n": 1}, to=["driver"])
        died = self.clock.seconds()
        self.broker.nack(conn, "driver", "pickup", mid)
        self.restart()
        [entry] = self.broker.queue("driver", "pickup.dead").entries()
        self.assertEqual((entry.message.id, entry.deliveries), (mid, 1))
        self.assertEqual(entry.dead, ("max-deliveries", died))
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 0)

    def test_last_delivery_before_crash(self):
        """A message sent for the last allowed time just before a crash goes to the dead letters on restart."""
        self.options = {"max_deliveries": 2}
        self.restart()
        mid = self.publish("pickup", {}, to=["driver"])
        self.broker.subscribe(self.connect(), "driver", "pickup")
        self.restart()
        self.broker.subscribe(self.connect(), "driver", "pickup")
        self.restart()
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 0)
        [entry] = self.broker.queue("driver", "pickup.dead").entries()
        self.assertEqual((entry.message.id, entry.deliveries), (mid, 2))

    def test_restart_forgets_old_consumers(self):
        """What a restart moves to the dead letters goes to no consumer of the stopped broker."""
        self.options = {"max_deliveries": 1}
        self.restart()
        self.broker.subscribe(self.connect(), "driver", "pickup")
        old = self.connect("old")
        self.broker.subscribe(old, "driver", "pickup.dead")
        self.publish("pickup", {}, to=["driver"])
        self.restart()
        self.assertEqual(old.deliveries, [])
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 1)

    def test_requeued_survive(self):
        """A requeued message is back in its queue after a restart, its count reset."""
        self.options = {"max_deliveries": 1}
        self.restart()
        conn = self.connect()
        self.broker.subscribe(conn, "driver", "pickup")
        mid = self.publish("pickup", {}, to=["driver"])
        self.broker.nack(conn, "driver", "pickup", mid)
        self.broker.unsubscribe(conn, "driver", "pickup")
        self.broker.requeue("driver", "pickup")
        self.restart()
        [entry] = self.broker.queue("driver", "pickup").entries()
        self.assertEqual(
            (entry.message.id, entry.deliveries, entry.dead), (mid, 0, None)
        )
        self.assertEqual(len(self.broker.queue("driver", "pickup.dead")), 0)

    def test_limits_and_expiry_survive(self):
        """A queue's maxLength and a message's expiry are kept."""
        self.broker.subscribe(self.connect(), "acme", "delivered", max_length=5)
        self.broker.publish("x", {}, b"{}", ("q",), None, 100)
        self.restart()
        self.assertEqual(self.broker.queue("acme", "delivered").max_length, 5)
        self.clock.advance(101)
        self.assertEqual(len(self.broker.queue("q", "x.dead")), 1)

    def test_restart_twice(self):
        """A second crash keeps what the first left, with counts going on."""
        mid = self.publish("pickup", {}, to=["driver"])
        self.broker.subscribe(self.connect(), "driver", "pickup")
        self.restart()
        self.broker.subscribe(self.connect(), "driver", "pickup")
        self.restart()
        conn = self.connect()
        self.broker.subscribe(conn, "driver", "pickup")
        self.assertEqual(conn.ids(), [mid])
        self.assertEqual(conn.deliveries[0]["deliveries"], 3)


class MemoryStoreTests(_StoreContract, SynchronousTestCase):
    def open_store(self):
        return MemoryStore()

    def reopen_store(self, store):
        return store


class SQLiteStoreTests(_StoreContract, SynchronousTestCase):
    def open_store(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-store-")
        self.addCleanup(scratch.cleanup)
        self.path = os.path.join(scratch.name, "caps.sqlite3")
        store = SQLiteStore.open(self.path, self.clock, runner=synchronous)
        self.addCleanup(lambda: self.store.close())
        return store

    def reopen_store(self, store):
        # A crash: nothing more is written, the file and lock are let go.
        store._connection.close()
        store._lock.close()
        return SQLiteStore.open(self.path, self.clock, runner=synchronous)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisStoreTests(_StoreContract, SynchronousTestCase):
    def open_store(self):
        server = redisserver.shared()
        server.client().flushall()
        self.url = server.url
        store = RedisStore.open(self.url, self.clock, runner=synchronous)
        self.addCleanup(lambda: self.store.close())
        return store

    def reopen_store(self, store):
        # A crash: nothing more is written, and the lock expires.
        store._renewing.stop()
        store._client.delete(LOCK_KEY)
        store._client.close()
        return RedisStore.open(self.url, self.clock, runner=synchronous)
