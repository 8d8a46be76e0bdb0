"""
What the broker tells observers: totals, the recent log, queue and client
rows, peek and purge.
"""

import json

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps.acl import OpenACL
from caps.auth import Realm
from caps.broker import Broker
from caps.monitor import Monitor
from caps.protocol import BrokerFactory

from .helpers import RecordingConnection
from .test_protocol import Client, frame


def body(**payload):
    return json.dumps(payload).encode()


class MonitorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.broker = Broker(self.clock, max_deliveries=2)

    def test_totals(self):
        """Publishes, deliveries, redeliveries, acknowledgements and dead letters are counted."""
        a = RecordingConnection("a")
        self.broker.connect(a)
        self.broker.subscribe(a, "driver", "pickup", ack_timeout=5)
        for n in range(3):
            self.broker.publish("pickup", {}, body(n=n), ("driver",), f"m{n}")
        self.broker.received("driver", "pickup", "m0")
        self.clock.advance(5)  # m1, m2 time out and are sent again
        self.clock.advance(5)  # and again: past max-deliveries, dead
        totals = self.broker.monitor.totals
        self.assertEqual(
            (
                totals.published,
                totals.delivered,
                totals.redelivered,
                totals.acknowledged,
                totals.dead_lettered,
            ),
            (3, 5, 2, 1, 2),
        )

    def test_queue_rows(self):
        """A queue row gives depth, in flight, dead letters, consumers, the oldest ready message's age and the counts."""
        a = RecordingConnection("a")
        self.broker.connect(a)
        self.broker.subscribe(a, "driver", "pickup", prefetch=1)
        self.broker.publish("pickup", {}, body(n=0), ("driver",))
        self.clock.advance(3)
        self.broker.publish("pickup", {}, body(n=1), ("driver",))
        self.clock.advance(2)
        self.broker.publish("other", {}, body(n=2), ("acme",))
        rows = self.broker.queue_rows()
        self.assertEqual(
            [(r["clientId"], r["event"]) for r in rows],
            [("acme", "other"), ("driver", "pickup")],
        )
        self.assertEqual(
            rows[1],
            {
                "clientId": "driver",
                "event": "pickup",
                "depth": 2,
                "inFlight": 1,
                "deadLetters": 0,
                "consumers": 1,
                "subscribed": True,
                "oldestAge": 2.0,
                "published": 2,
                "delivered": 1,
            },
        )
        self.assertEqual(
            self.broker.queue_rows(visible=lambda c: c == "acme")[0]["clientId"],
            "acme",
        )
        self.assertEqual(len(self.broker.queue_rows(visible=lambda c: False)), 0)

    def test_peek_and_purge(self):
        """Peek pages through a queue without consuming it; purge deletes what is not in flight."""
        a = RecordingConnection("a")
        self.broker.connect(a)
        for n in range(5):
            self.broker.publish("pickup", {}, body(n=n), ("driver",), f"m{n}")
        self.broker.subscribe(a, "driver", "pickup", prefetch=1)
        rows, more = self.broker.peek("driver", "pickup", limit=2)
        self.assertEqual([r["messageId"] for r in rows], ["m0", "m1"])
        self.assertEqual(more, 3)
        self.assertEqual([r["inFlight"] for r in rows], [True, False])
        rows, more = self.broker.peek("driver", "pickup", after=rows[-1]["seq"])
        self.assertEqual([r["messageId"] for r in rows], ["m2", "m3", "m4"])
        self.assertEqual((json.loads(rows[0]["payload"]), more), ({"n": 2}, 0))
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 5)
        self.assertEqual(self.broker.purge("driver", "pickup"), 4)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 1)
        self.assertEqual(self.broker.peek("nobody", "x"), ([], 0))
        # The one in flight can still be acknowledged.
        self.assertTrue(self.broker.received("driver", "pickup", "m0")["deleted"])

    def test_recent(self):
        """The recent log keeps the newest messages with their recipients, and finds those involving a clientId."""
        broker = Broker(self.clock, monitor=Monitor(size=3))
        broker.publish("pickup", {}, body(store="acme", orderId="1"), ("driver",))
        broker.publish("delivered", {}, body(orderId="1"), ("acme",))
        broker.publish("pickup", {}, body(store="flowers"), ("driver",))
        broker.publish("delivered", {}, body(orderId="2"), ("flowers",))
        recent = broker.monitor.since()
        self.assertEqual([r.seq for r in recent], [2, 3, 4])
        self.assertEqual([r.seq for r in broker.monitor.since(2)], [3, 4])
        self.assertEqual([r.seq for r in broker.monitor.since(0, "acme")], [2])
        self.assertEqual([r.seq for r in broker.monitor.since(0, "flowers")], [3, 4])
        self.assertEqual(
            recent[0].as_json(),
            {
                "seq": 2,
                "time": 1000.0,
                "event": "delivered",
                "messageId": recent[0].message.id,
                "recipients": ["acme"],
                "sender": None,
                "payload": {"orderId": "1"},
            },
        )

    def test_recent_bytes(self):
        """The recent log also drops its oldest messages to keep their payloads under max_bytes."""
        broker = Broker(self.clock, monitor=Monitor(size=100, max_bytes=100))
        for _ in range(10):
            broker.publish("e", {}, b"x" * 30, ("q",))
        self.assertEqual([r.seq for r in broker.monitor.since()], [8, 9, 10])
        broker.publish("e", {}, b"x" * 500, ("q",))
        # One message alone is kept, however large.
        self.assertEqual([r.seq for r in broker.monitor.since()], [11])

    def test_listeners(self):
        """Listeners hear of each new message as it is published."""
        heard = []
        self.broker.monitor.listeners.add(heard.append)
        self.broker.publish("pickup", {}, body(), ("driver",))
        self.assertEqual([r.recipients for r in heard], [("driver",)])

    def test_watchers(self):
        """A watcher of a clientId hears only the messages involving it: sent, received, or naming it as store on an open broker."""
        heard = {"acme": [], "flowers": []}
        for client_id, told in heard.items():
            self.broker.monitor.watch(client_id, told.append)
        self.broker.publish("delivered", {}, body(), ("acme",))
        self.broker.publish("pickup", {}, body(store="flowers"), ("driver",))
        self.broker.publish("pickup", {}, body(), ("driver",), sender="acme")
        self.broker.publish("pickup", {}, body(), ("driver",))
        self.assertEqual([r.seq for r in heard["acme"]], [1, 3])
        self.assertEqual([r.seq for r in heard["flowers"]], [2])
        self.broker.monitor.unwatch("acme", heard["acme"].append)
        self.broker.monitor.unwatch("flowers", heard["flowers"].append)
        self.assertEqual(self.broker.monitor.watchers, {})

    def test_rows_of_one_client(self):
        """Queue rows of one clientId come from its own index, and follow deletions."""
        a = RecordingConnection("a")
        self.broker.connect(a)
        for client_id, event in (("acme", "b"), ("acme", "a"), ("flowers", "a")):
            self.broker.publish(event, {}, body(), (client_id,))
        rows = self.broker.queue_rows(client_id="acme")
        self.assertEqual([r["event"] for r in rows], ["a", "b"])
        self.broker.subscribe(a, "acme", "a")
        self.broker.unsubscribe(a, "acme", "a", delete=True)
        self.assertEqual(
            [r["event"] for r in self.broker.queue_rows(client_id="acme")], ["b"]
        )
        self.assertEqual(self.broker.queue_rows(client_id="nobody"), [])

    def test_failing_listener(self):
        """A listener that fails is logged, and the publish still goes through."""

        def broken(recent):
            raise RuntimeError("observer bug")

        self.broker.monitor.listeners.add(broken)
        answer = self.broker.publish("pickup", {}, body(), ("driver",))
        self.assertEqual(answer["queues"], 1)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_store_field_needs_open_broker(self):
        """A payload's store field puts a message on that store's page only when no sender is known (an open broker)."""
        self.broker.publish("pickup", {}, body(store="acme"), ("driver",))
        self.broker.publish(
            "pickup", {}, body(store="acme"), ("driver",), sender="mallory"
        )
        involved = self.broker.monitor.since(0, "acme")
        self.assertEqual([r.sender for r in involved], [None])
        self.assertEqual(len(self.broker.monitor.since(0, "mallory")), 1)


class ClientRowTests(SynchronousTestCase):
    def test_client_rows_and_sender(self):
        """Client rows name each connection's address, login and subscriptions; a logged-in publisher is the message's sender."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(acme=b"pw")
        broker = Broker(Clock())
        factory = BrokerFactory(broker, portal=Portal(Realm(OpenACL()), [checker]))
        client = Client(factory, 4321, host="10.0.0.7")
        client.send(frame("login", {"clientId": "acme", "password": "pw"}, id=1))
        client.send(frame("subscribe", {"clientId": "acme", "event": "d"}, id=2))
        client.send(frame("d", {"n": 1}, to="acme", id=3))
        self.assertEqual(
            broker.client_rows(),
            [
                {
                    "address": "10.0.0.7:4321",
                    "clientId": "acme",
                    "subscriptions": [{"clientId": "acme", "event": "d"}],
                    "inFlight": 1,
                }
            ],
        )
        self.assertEqual(broker.client_rows(visible=lambda c: c == "other"), [])
        self.assertEqual(broker.monitor.since()[0].sender, "acme")
