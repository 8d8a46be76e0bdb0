"""
Tests for caps.broker: routing, queues and in-flight tracking, driven
synchronously with recording connections and a fake clock.
"""

import json

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from caps.broker import Broker, IConnection
from caps.frames import encode_json

from .helpers import RecordingConnection


class BrokerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.broker = Broker(self.clock)

    def connect(self, name="conn"):
        conn = RecordingConnection(name)
        self.broker.connect(conn)
        return conn

    def publish(self, event, payload=None, to=(), message_id=None):
        payload = {} if payload is None else payload
        return self.broker.publish(
            event, payload, encode_json(payload), tuple(to), message_id
        )

    def test_recording_connection_provides_interface(self):
        """The test double implements the interface the broker relies on."""
        verifyObject(IConnection, RecordingConnection())

    def test_backlog_then_live(self):
        """A subscriber gets the backlog oldest first, then new messages as they come."""
        for n in range(3):
            self.publish("delivered", {"n": n}, to=["acme"])
        conn = self.connect()
        result = self.broker.subscribe(conn, "acme", "delivered")
        self.assertEqual(
            result, {"clientId": "acme", "event": "delivered", "messages": 3}
        )
        self.publish("delivered", {"n": 3}, to=["acme"])
        self.assertEqual([d["payload"]["n"] for d in conn.deliveries], [0, 1, 2, 3])
        self.assertEqual({d["redelivered"] for d in conn.deliveries}, {False})

    def test_unaddressed_without_queue_is_not_kept(self):
        """A message that reaches no queue is reported as such and not kept."""
        self.assertEqual(self.publish("pickup", {"a": 1})["queues"], 0)
        conn = self.connect()
        self.broker.subscribe(conn, "driver", "pickup")
        self.assertEqual(conn.deliveries, [])

    def test_addressed_creates_queue(self):
        """Addressing a clientId creates its queue, which holds the message for later."""
        result = self.publish("delivered", {"orderId": "1"}, to=["acme"])
        self.assertEqual(result["queues"], 1)
        self.assertEqual(len(self.broker.queue("acme", "delivered")), 1)

    def test_fan_out(self):
        """Several addressees each get their own copy."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "acme", "delivered")
        self.broker.subscribe(b, "flowers", "delivered")
        result = self.publish("delivered", {"x": 1}, to=["acme", "flowers"])
        self.assertEqual(result["queues"], 2)
        self.assertEqual(a.ids(), [result["messageId"]])
        self.assertEqual(b.ids(), [result["messageId"]])
        self.assertEqual(a.deliveries[0]["clientId"], "acme")
        self.assertEqual(b.deliveries[0]["clientId"], "flowers")

    def test_filtered_routing(self):
        """Unaddressed messages reach only the queues whose filter matches."""
        acme, flowers = self.connect("acme"), self.connect("flowers")
        self.broker.subscribe(acme, "acme", "delivered", {"store": "acme"})
        self.broker.subscribe(flowers, "flowers", "delivered", {"store": "flowers"})
        self.publish("delivered", {"store": "acme", "orderId": "1"})
        self.publish("delivered", {"store": "flowers", "orderId": "2"})
        self.publish("delivered", {"store": "nobody", "orderId": "3"})
        self.assertEqual([d["payload"]["orderId"] for d in acme.deliveries], ["1"])
        self.assertEqual([d["payload"]["orderId"] for d in flowers.deliveries], ["2"])

    def test_addressed_and_filtered_once(self):
        """A queue both addressed and matched by its filter gets one copy."""
        acme = self.connect()
        self.broker.subscribe(acme, "acme", "delivered", {"store": "acme"})
        result = self.publish("delivered", {"store": "acme"}, to=["acme"])
        self.assertEqual(result["queues"], 1)
        self.assertEqual(len(acme.deliveries), 1)

    def test_observer_sees_addressed_messages(self):
        """An unfiltered subscription observes messages addressed to others too."""
        logger = self.connect()
        self.broker.subscribe(logger, "logger", "delivered")
        result = self.publish("delivered", {"store": "acme"}, to=["acme"])
        self.assertEqual(result["queues"], 2)
        self.assertEqual(logger.deliveries[0]["clientId"], "logger")

    def test_subscription_survives_disconnect(self):
        """An offline client's queue keeps collecting what its subscription matches."""
        vendor = self.connect()
        self.broker.subscribe(vendor, "acme", "delivered", {"store": "acme"})
        self.broker.disconnect(vendor)
        self.publish("delivered", {"store": "acme", "orderId": "late"})
        again = self.connect()
        self.broker.subscribe(again, "acme", "delivered", {"store": "acme"})
        self.assertEqual([d["payload"]["orderId"] for d in again.deliveries], ["late"])

    def test_competing_consumers(self):
        """Two consumers of one queue share 100 messages: each message to exactly one of them."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "driver", "pickup")
        self.broker.subscribe(b, "driver", "pickup")
        ids = [
            self.publish("pickup", {"n": n}, to=["driver"])["messageId"]
            for n in range(100)
        ]
        self.assertEqual(sorted(a.ids() + b.ids()), sorted(ids))
        self.assertEqual(set(a.ids()) & set(b.ids()), set())
        self.assertEqual((len(a.ids()), len(b.ids())), (50, 50))
        # Each consumer sees its share in publish order.
        self.assertEqual(a.ids(), [i for i in ids if i in set(a.ids())])

    def test_received_deletes(self):
        """Acknowledging deletes the message; acknowledging again or an unknown id is harmless."""
        conn = self.connect()
        self.broker.subscribe(conn, "acme", "delivered")
        mid = self.publish("delivered", {}, to=["acme"])["messageId"]
        self.assertEqual(
            self.broker.received("acme", "delivered", mid),
            {
                "clientId": "acme",
                "event": "delivered",
                "messageId": mid,
                "deleted": True,
            },
        )
        self.assertFalse(self.broker.received("acme", "delivered", mid)["deleted"])
        self.assertFalse(self.broker.received("acme", "delivered", "nope")["deleted"])
        self.assertFalse(self.broker.received("nobody", "delivered", mid)["deleted"])
        self.assertEqual(len(self.broker.queue("acme", "delivered")), 0)
        self.broker.disconnect(conn)
        again = self.connect()
        self.broker.subscribe(again, "acme", "delivered")
        self.assertEqual(again.deliveries, [])

    def test_redelivery_after_disconnect(self):
        """Unacknowledged messages return to their place and are redelivered, in order, flagged."""
        a = self.connect("a")
        self.broker.subscribe(a, "driver", "pickup")
        ids = [
            self.publish("pickup", {"n": n}, to=["driver"])["messageId"]
            for n in range(4)
        ]
        self.broker.received("driver", "pickup", ids[1])
        b = self.connect("b")
        self.broker.subscribe(b, "driver", "pickup")
        self.broker.disconnect(a)
        self.assertEqual(b.ids(), [ids[0], ids[2], ids[3]])
        self.assertEqual([d["redelivered"] for d in b.deliveries], [True, True, True])
        self.assertEqual([d["deliveries"] for d in b.deliveries], [2, 2, 2])
        new = self.publish("pickup", {"n": 4}, to=["driver"])["messageId"]
        self.assertEqual(b.ids()[-1], new)
        self.assertFalse(b.deliveries[-1]["redelivered"])

    def test_redelivered_on_next_subscribe(self):
        """With no other consumer, returned messages wait for the next subscribe."""
        a = self.connect()
        self.broker.subscribe(a, "acme", "delivered")
        mid = self.publish("delivered", {}, to=["acme"])["messageId"]
        self.broker.disconnect(a)
        self.assertEqual(len(self.broker.queue("acme", "delivered")), 1)
        b = self.connect()
        self.broker.subscribe(b, "acme", "delivered")
        self.assertEqual(b.ids(), [mid])
        self.assertTrue(b.deliveries[0]["redelivered"])

    def test_late_ack_from_other_connection(self):
        """A received from any connection deletes a message in flight to another."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "acme", "delivered")
        mid = self.publish("delivered", {}, to=["acme"])["messageId"]
        self.assertTrue(self.broker.received("acme", "delivered", mid)["deleted"])
        self.broker.disconnect(a)
        self.broker.subscribe(b, "acme", "delivered")
        self.assertEqual(b.deliveries, [])

    def test_get_all(self):
        """getAll sends every message not in flight, oldest first, and counts them."""
        ids = [
            self.publish("delivered", {"n": n}, to=["acme"])["messageId"]
            for n in range(3)
        ]
        poller = self.connect()
        self.assertEqual(
            self.successResultOf(self.broker.get_all(poller, "acme", "delivered")),
            {"clientId": "acme", "event": "delivered", "count": 3},
        )
        self.assertEqual(poller.ids(), ids)
        # They are now in flight to the poller: a second getAll sends nothing.
        other = self.connect()
        self.assertEqual(
            self.successResultOf(self.broker.get_all(other, "acme", "delivered"))[
                "count"
            ],
            0,
        )
        # Until the poller goes away without acknowledging.
        self.broker.received("acme", "delivered", ids[0])
        self.broker.disconnect(poller)
        self.assertEqual(
            self.successResultOf(self.broker.get_all(other, "acme", "delivered"))[
                "count"
            ],
            2,
        )
        self.assertEqual(other.ids(), ids[1:])

    def test_get_all_unknown_queue(self):
        """getAll on a queue that does not exist counts 0 and does not create it."""
        conn = self.connect()
        self.assertEqual(
            self.successResultOf(self.broker.get_all(conn, "ghost", "delivered"))[
                "count"
            ],
            0,
        )
        self.assertIsNone(self.broker.queue("ghost", "delivered"))

    def test_get_all_does_not_subscribe(self):
        """A polling client gets later messages only by asking again."""
        poller = self.connect()
        self.publish("delivered", {}, to=["acme"])
        self.successResultOf(self.broker.get_all(poller, "acme", "delivered"))
        self.publish("delivered", {}, to=["acme"])
        self.assertEqual(len(poller.deliveries), 1)

    def test_unsubscribe_returns_in_flight(self):
        """Unsubscribing stops delivery and gives this connection's messages back."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "driver", "pickup")
        mid = self.publish("pickup", {}, to=["driver"])["messageId"]
        result = self.broker.unsubscribe(a, "driver", "pickup")
        self.assertEqual(
            result, {"clientId": "driver", "event": "pickup", "deleted": False}
        )
        self.publish("pickup", {}, to=["driver"])
        self.assertEqual(len(a.deliveries), 1)
        self.broker.subscribe(b, "driver", "pickup")
        self.assertEqual(b.ids()[0], mid)
        self.assertTrue(b.deliveries[0]["redelivered"])
        self.assertEqual(len(b.deliveries), 2)

    def test_unsubscribe_keeps_routing(self):
        """After unsubscribing, the queue still collects what its subscription matches."""
        a = self.connect()
        self.broker.subscribe(a, "acme", "delivered", {"store": "acme"})
        self.broker.unsubscribe(a, "acme", "delivered")
        self.assertEqual(self.publish("delivered", {"store": "acme"})["queues"], 1)

    def test_unsubscribe_delete(self):
        """Deleting a queue removes its messages and its subscription."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "acme", "delivered", {"store": "acme"})
        self.broker.subscribe(b, "acme", "delivered", {"store": "acme"})
        mid = self.publish("delivered", {"store": "acme"})["messageId"]
        self.publish("delivered", {"store": "acme"})
        result = self.broker.unsubscribe(a, "acme", "delivered", delete=True)
        self.assertTrue(result["deleted"])
        self.assertIsNone(self.broker.queue("acme", "delivered"))
        self.assertEqual(self.publish("delivered", {"store": "acme"})["queues"], 0)
        # A late acknowledgement and disconnects are harmless.
        self.assertFalse(self.broker.received("acme", "delivered", mid)["deleted"])
        self.broker.disconnect(a)
        self.broker.disconnect(b)
        self.assertFalse(
            self.broker.unsubscribe(self.connect(), "acme", "delivered")["deleted"]
        )

    def test_delete_releases_messages(self):
        """Deleting a queue frees its messages' ids and leaves other queues' copies alone."""
        a, b = self.connect("a"), self.connect("b")
        self.broker.subscribe(a, "acme", "delivered")
        self.publish("delivered", {}, to=["acme", "logger"], message_id="shared")
        self.publish("delivered", {}, to=["acme"], message_id="only")
        self.broker.unsubscribe(b, "acme", "delivered", delete=True)
        # The consumer that held them goes away: nothing comes back anywhere.
        self.broker.disconnect(a)
        self.assertEqual(len(self.broker.queue("logger", "delivered")), 1)
        self.clock.advance(601)
        # "only" left every queue and its window passed: it is new again.
        self.assertEqual(
            self.publish("delivered", {}, to=["acme"], message_id="only")["queues"], 1
        )
        self.assertTrue(
            self.publish("delivered", {}, to=["x"], message_id="shared").get(
                "duplicate"
            )
        )
        again = self.connect("again")
        self.broker.subscribe(again, "acme", "delivered")
        self.assertEqual(again.ids(), ["only"])
        self.assertEqual(again.deliveries[0]["deliveries"], 1)

    def test_event_log_off(self):
        """With log_events off, publishing logs nothing."""
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.broker.log_events = False
        self.publish("pickup", {"store": "acme"}, to=["driver"])
        self.assertEqual(
            [e for e in seen if e.get("log_namespace") == "caps.broker.Broker"], []
        )

    def test_broker_protocol_is_a_connection(self):
        """The real protocol provides the interface the broker talks to."""
        from twisted.internet.testing import StringTransport

        from caps.protocol import BrokerFactory

        protocol = BrokerFactory(self.broker).buildProtocol(None)
        protocol.makeConnection(StringTransport())
        verifyObject(IConnection, protocol)

    def test_dedupe_while_queued(self):
        """A messageId still queued is a duplicate however long ago it was published."""
        first = self.publish(
            "delivered", {"v": 1}, to=["acme"], message_id="delivered:1"
        )
        self.clock.advance(3600)
        again = self.publish(
            "delivered", {"v": 2}, to=["acme"], message_id="delivered:1"
        )
        self.assertEqual(first, {"messageId": "delivered:1", "queues": 1})
        self.assertEqual(
            again, {"messageId": "delivered:1", "queues": 0, "duplicate": True}
        )
        conn = self.connect()
        self.broker.subscribe(conn, "acme", "delivered")
        self.assertEqual([d["payload"] for d in conn.deliveries], [{"v": 1}])

    def test_dedupe_window(self):
        """An acknowledged messageId is a duplicate for 10 minutes, then new again."""
        conn = self.connect()
        self.broker.subscribe(conn, "acme", "delivered")
        self.publish("delivered", {}, to=["acme"], message_id="m")
        self.broker.received("acme", "delivered", "m")
        self.clock.advance(599)
        self.assertTrue(
            self.publish("delivered", {}, to=["acme"], message_id="m").get("duplicate")
        )
        self.clock.advance(1)
        self.assertEqual(
            self.publish("delivered", {}, to=["acme"], message_id="m"),
            {"messageId": "m", "queues": 1},
        )
        self.assertEqual(len(conn.deliveries), 2)

    def test_dedupe_unrouted(self):
        """A messageId is remembered even when its message reached no queue."""
        self.publish("pickup", {}, message_id="p1")
        self.assertTrue(
            self.publish("pickup", {}, to=["driver"], message_id="p1").get("duplicate")
        )

    def test_assigned_ids_are_unique(self):
        """Ids the broker assigns differ between messages and between broker instances."""
        ids = {self.publish("e", {}, to=["c"])["messageId"] for _ in range(100)}
        other = Broker(self.clock).publish("e", {}, b"{}", ("c",))["messageId"]
        self.assertEqual(len(ids), 100)
        self.assertNotIn(other, ids)

    def test_assigned_id_never_taken(self):
        """An id a client chose is never assigned by the broker to another message."""
        first = self.publish("e", {}, to=["c"])["messageId"]
        prefix, seq = first.rsplit("-", 1)
        # The squatting publish takes sequence number 2 itself, so the
        # broker's next id would be number 3.
        squatted = f"{prefix}-{int(seq) + 2}"
        self.assertEqual(
            self.publish("e", {"n": 1}, to=["c"], message_id=squatted)["messageId"],
            squatted,
        )
        assigned = self.publish("e", {"n": 2}, to=["c"])["messageId"]
        self.assertNotIn(assigned, (first, squatted))
        for message_id in (first, squatted, assigned):
            self.assertTrue(self.broker.received("c", "e", message_id)["deleted"])

    def test_event_log(self):
        """Every publish is logged in the hub style, EVENT {event, time, payload}."""
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.clock.advance(0.5)
        self.publish("pickup", {"store": "acme", "customer": "Zoë"}, to=["driver"])
        self.clock.advance(0)
        [event] = [e for e in seen if e.get("log_namespace") == "caps.broker.Broker"]
        self.assertEqual(event["log_level"], LogLevel.info)
        text = formatEvent(event)
        self.assertTrue(text.startswith("EVENT "), text)
        record = json.loads(text[len("EVENT ") :])
        self.assertEqual(
            record,
            {
                "event": "pickup",
                "time": "2023-11-14T22:13:20.500000+00:00",
                "payload": {"store": "acme", "customer": "Zoë"},
            },
        )

    def test_event_log_batches_a_turn(self):
        """The messages of one reactor turn are logged together, a line each, in order; stopping logs what is left."""
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)

        def logged():
            return [
                formatEvent(e)
                for e in seen
                if e.get("log_namespace") == "caps.broker.Broker"
            ]

        for n in range(3):
            self.publish("pickup", {"n": n}, to=["driver"])
        self.assertEqual(logged(), [])
        self.clock.advance(0)
        [text] = logged()
        lines = text.split("\n")
        self.assertEqual(
            [json.loads(line[len("EVENT ") :])["payload"] for line in lines],
            [{"n": 0}, {"n": 1}, {"n": 2}],
        )
        self.publish("pickup", {"n": 3}, to=["driver"])
        self.broker.stop()
        self.assertEqual(len(logged()), 2)
        self.assertIn('"payload": {"n":3}', logged()[1])
        self.assertEqual(self.clock.getDelayedCalls(), [])
