"""
Tests for caps.protocol: bytes in, frames and deliveries out, over
StringTransport.
"""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.protocol import BrokerFactory
from caps.store import UNAVAILABLE, StoreUnavailable
from caps.store.memory import MemoryStore


def frame(event, payload=None, **fields):
    obj = {"event": event}
    if payload is not None:
        obj["payload"] = payload
    obj.update(fields)
    return json.dumps(obj).encode("utf-8") + b"\n"


class Client:
    """
    One connection to the broker over a StringTransport.
    """

    def __init__(self, factory, port, host="127.0.0.1", transport=StringTransport):
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = transport(peerAddress=IPv4Address("TCP", host, port))
        self.protocol.makeConnection(self.transport)

    def send(self, data):
        self.protocol.dataReceived(data)

    def frames(self):
        """
        Every frame written since the last call, decoded.
        """
        data = self.transport.value()
        self.transport.clear()
        self.assert_lines(data)
        return [json.loads(line) for line in data.splitlines()]

    @staticmethod
    def assert_lines(data):
        assert data == b"" or data.endswith(b"\n"), data

    def close(self):
        self.protocol.connectionLost(None)


class ProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock)
        self.factory = BrokerFactory(self.broker, max_line=64 * 1024)
        self.ports = iter(range(40000, 50000))

    def connect(self):
        return Client(self.factory, next(self.ports))

    def assertError(self, client, data, code, request_id=None, mentions=None):
        client.send(data)
        [reply] = client.frames()
        self.assertEqual(reply["event"], "error")
        self.assertEqual(reply["payload"]["code"], code)
        self.assertEqual(reply.get("id"), request_id)
        self.assertIsInstance(reply["payload"]["message"], str)
        self.assertNotIn("Traceback", reply["payload"]["message"])
        if mentions:
            self.assertIn(mentions, reply["payload"]["message"])
        return reply

    def test_vendor_driver_round_trip(self):
        """A pickup goes to the driver, the delivered comes back to the store, acks delete both."""
        driver, vendor = self.connect(), self.connect()
        driver.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}, id=1))
        vendor.send(
            frame(
                "subscribe",
                {"clientId": "acme", "event": "delivered", "filter": {"store": "acme"}},
                id=1,
            )
        )
        self.assertEqual(driver.frames()[0]["event"], "ok")
        self.assertEqual(vendor.frames()[0]["event"], "ok")

        vendor.send(
            frame(
                "pickup",
                {"store": "acme", "orderId": "o1"},
                to="driver",
                id=2,
                messageId="pickup:o1",
            )
        )
        self.assertEqual(
            vendor.frames(),
            [
                {
                    "event": "ok",
                    "id": 2,
                    "payload": {"messageId": "pickup:o1", "queues": 1},
                }
            ],
        )
        self.assertEqual(
            driver.frames(),
            [
                {
                    "event": "pickup",
                    "clientId": "driver",
                    "messageId": "pickup:o1",
                    "payload": {"store": "acme", "orderId": "o1"},
                    "redelivered": False,
                    "deliveries": 1,
                }
            ],
        )
        driver.send(
            frame("delivered", {"store": "acme", "orderId": "o1"}, to="acme", id=3)
        )
        [ok] = driver.frames()
        [delivery] = vendor.frames()
        self.assertEqual(delivery["event"], "delivered")
        self.assertEqual(delivery["clientId"], "acme")
        self.assertEqual(delivery["messageId"], ok["payload"]["messageId"])
        driver.send(
            frame(
                "received",
                {"clientId": "driver", "event": "pickup", "messageId": "pickup:o1"},
                id=4,
            )
        )
        self.assertEqual(driver.frames()[0]["payload"]["deleted"], True)
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 0)

    def test_crlf_and_lf(self):
        """Lines ending in \\r\\n (telnet) and \\n (netcat) both work; blank lines are ignored."""
        client = self.connect()
        client.send(b'{"event":"ping","id":1}\r\n\r\n\n{"event":"ping","id":2}\n')
        self.assertEqual([f["id"] for f in client.frames()], [1, 2])

    def test_split_at_every_offset(self):
        """The same bytes split at any offset give the same answers."""
        data = (
            frame("subscribe", {"clientId": "acme", "event": "delivered"}, id=1)
            + frame("delivered", {"customer": "Zoë 東京"}, to="acme", id=2)
            + b'{"event":"ping","id":3}\r\n'
        )
        expected = None
        for offset in range(len(data) + 1):
            self.broker = Broker(self.clock)
            self.factory = BrokerFactory(self.broker)
            client = self.connect()
            client.send(data[:offset])
            client.send(data[offset:])
            got = [
                (f["event"], f.get("id"), f.get("payload", {}).get("customer"))
                for f in client.frames()
            ]
            if expected is None:
                expected = got
                self.assertEqual(len(expected), 4)
            self.assertEqual(got, expected, f"split at {offset}")

    def test_ok_only_with_id(self):
        """Frames without id get no ok, except getAll (always answered) and ping (pong)."""
        client = self.connect()
        client.send(frame("subscribe", {"clientId": "acme", "event": "delivered"}))
        client.send(frame("pickup", {}, to="nobody"))
        client.send(
            frame(
                "received", {"clientId": "acme", "event": "delivered", "messageId": "x"}
            )
        )
        client.send(frame("unsubscribe", {"clientId": "acme", "event": "delivered"}))
        self.assertEqual(client.frames(), [])
        client.send(frame("getAll", {"clientId": "acme", "event": "delivered"}))
        client.send(frame("ping", {"t": 1}))
        self.assertEqual(
            client.frames(),
            [
                {
                    "event": "ok",
                    "payload": {"clientId": "acme", "event": "delivered", "count": 0},
                },
                {"event": "pong", "payload": {"t": 1}},
            ],
        )

    def test_ping(self):
        """ping is answered by pong with the same payload and id."""
        client = self.connect()
        client.send(frame("ping", {"nested": {"a": [1, 2]}}, id="p"))
        self.assertEqual(
            client.frames(),
            [{"event": "pong", "payload": {"nested": {"a": [1, 2]}}, "id": "p"}],
        )

    def test_get_all_ends_catch_up(self):
        """getAll's ok comes after every message it sent."""
        publisher, vendor = self.connect(), self.connect()
        for n in range(3):
            publisher.send(frame("delivered", {"n": n}, to="acme"))
        vendor.send(frame("getall", {"clientId": "acme", "event": "delivered"}, id="g"))
        got = vendor.frames()
        self.assertEqual([f.get("payload", {}).get("n") for f in got[:3]], [0, 1, 2])
        self.assertEqual(
            got[3],
            {
                "event": "ok",
                "id": "g",
                "payload": {"clientId": "acme", "event": "delivered", "count": 3},
            },
        )

    def test_every_error_code(self):
        """Each kind of bad input gets its error code, and the connection stays usable."""
        client = self.connect()
        self.assertError(client, b"not json\n", "bad-json")
        self.assertError(
            client, b'{"event":"ping","id":1,"payload":{"x":"\xff"}}\n', "bad-json"
        )
        self.assertError(client, b"[1,2]\n", "bad-frame")
        self.assertError(
            client,
            frame("subscribe", {"clientId": "acme"}, id=5),
            "bad-frame",
            5,
            "payload.event",
        )
        self.assertError(
            client, frame("delivered", [1], id=6), "bad-frame", 6, "payload"
        )
        self.assertError(client, frame("logout", {}, id=7), "reserved-event", 7)
        self.assertError(client, frame("bad name", {}, id=8), "bad-name", 8)
        client.send(frame("ping", id=9))
        self.assertEqual(client.frames(), [{"event": "pong", "payload": {}, "id": 9}])
        self.assertFalse(client.transport.disconnecting)

    def test_bad_input_does_not_touch_others(self):
        """Garbage from one client leaves other clients' queues and deliveries alone."""
        vendor, attacker = self.connect(), self.connect()
        vendor.send(
            frame("subscribe", {"clientId": "acme", "event": "delivered"}, id=1)
        )
        vendor.frames()
        attacker.send(
            b"\x00\xff{{{\n"
            + b"[" * 10000
            + b"\n"
            + frame("received", {"clientId": "acme"})
        )
        attacker.send(frame("delivered", {"n": 1}, to="acme"))
        [delivery] = vendor.frames()
        self.assertEqual(delivery["payload"], {"n": 1})
        self.assertEqual(len(attacker.frames()), 3)

    def test_big_payload(self):
        """A 60 KiB payload is accepted and delivered intact."""
        client = self.connect()
        client.send(frame("subscribe", {"clientId": "acme", "event": "delivered"}))
        blob = "x" * (60 * 1024)
        client.send(frame("delivered", {"blob": blob}, to="acme", id=1))
        got = client.frames()
        self.assertEqual(got[0]["payload"]["blob"], blob)
        self.assertEqual(got[1]["event"], "ok")

    def test_line_too_long(self):
        """A line over the limit gets line-too-long and the connection is closed."""
        self.factory = BrokerFactory(self.broker, max_line=100)
        client = self.connect()
        client.send(b'{"event":"ping","id":1}\n')
        client.frames()
        client.send(
            b'{"event":"ping","payload":{"x":"'
            + b"y" * 200
            + b'"}}\n{"event":"ping"}\n'
        )
        reply = self.assertError(client, b"", "line-too-long", mentions="100")
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(reply.get("id"), None)

    def test_unfinished_line_too_long(self):
        """A client streaming a line without end is cut off once it passes the limit."""
        self.factory = BrokerFactory(self.broker, max_line=100)
        client = self.connect()
        client.send(b"x" * 90)
        self.assertEqual(client.frames(), [])
        client.send(b"x" * 90)
        [reply] = client.frames()
        self.assertEqual(reply["payload"]["code"], "line-too-long")
        self.assertTrue(client.transport.disconnecting)

    def test_limit_is_exact(self):
        """A line of exactly the limit passes, with \\n or \\r\\n; one byte more does not."""
        self.factory = BrokerFactory(self.broker, max_line=40)
        line = b'{"event":"ping","payload":{"x":"' + b"y" * 5 + b'"}}'
        self.assertEqual(len(line), 40)
        client = self.connect()
        client.send(line + b"\n" + line + b"\r\n")
        self.assertEqual([f["event"] for f in client.frames()], ["pong", "pong"])
        client.send(line[:-3] + b'y"}}\n')
        self.assertEqual(client.frames()[0]["payload"]["code"], "line-too-long")

    def test_disconnect_returns_messages(self):
        """Closing a connection sends its unacknowledged messages to another consumer, redelivered."""
        a, b = self.connect(), self.connect()
        a.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}))
        a.send(frame("pickup", {"n": 1}, to="driver", messageId="p1"))
        self.assertEqual(a.frames()[0]["messageId"], "p1")
        b.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}))
        self.assertEqual(b.frames(), [])
        a.close()
        [delivery] = b.frames()
        self.assertEqual(
            (delivery["messageId"], delivery["redelivered"], delivery["deliveries"]),
            ("p1", True, 2),
        )

    def test_duplicate_publish(self):
        """Publishing a known messageId again is ok with duplicate: true and delivers nothing."""
        client = self.connect()
        client.send(frame("delivered", {}, to="acme", messageId="d1", id=1))
        client.send(frame("delivered", {}, to="acme", messageId="d1", id=2))
        self.assertEqual(
            [f["payload"] for f in client.frames()],
            [
                {"messageId": "d1", "queues": 1},
                {"messageId": "d1", "queues": 0, "duplicate": True},
            ],
        )

    def test_internal_error_is_generic(self):
        """A bug in the broker is logged; the client gets internal-error and no traceback."""

        class BrokenBroker(Broker):
            def publish(self, *args):
                raise ZeroDivisionError("secret internals at /srv/caps/broker.py")

        self.factory = BrokerFactory(BrokenBroker(self.clock))
        client = self.connect()
        reply = self.assertError(
            client, frame("delivered", {}, id=1), "internal-error", 1
        )
        self.assertNotIn("secret", json.dumps(reply))
        self.assertNotIn("broker.py", json.dumps(reply))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        client.send(frame("ping", id=2))
        self.assertEqual(client.frames()[0]["event"], "pong")


class ProtocolDeliveryControlTests(SynchronousTestCase):
    """
    The delivery-control frames and behaviour as seen on the wire.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.broker = Broker(self.clock, max_deliveries=2, ack_timeout=1000)
        self.addCleanup(self.broker.stop)
        self.factory = BrokerFactory(self.broker, idle_timeout=60)
        self.ports = iter(range(40000, 50000))

    def connect(self):
        client = Client(self.factory, next(self.ports))
        self.addCleanup(lambda: client.transport.disconnecting or client.close())
        return client

    def test_option_validation(self):
        """Bad prefetch, ackTimeout, maxLength, delay and ttl values are bad-frame, naming the field."""
        client = self.connect()
        queue = {"clientId": "driver", "event": "pickup"}
        cases = [
            (frame("subscribe", dict(queue, prefetch=0), id=1), "payload.prefetch"),
            (frame("subscribe", dict(queue, prefetch=1.5), id=2), "payload.prefetch"),
            (frame("subscribe", dict(queue, prefetch=True), id=3), "payload.prefetch"),
            (
                frame("subscribe", dict(queue, ackTimeout=-1), id=4),
                "payload.ackTimeout",
            ),
            (
                frame("subscribe", dict(queue, ackTimeout=1e300), id=5),
                "payload.ackTimeout",
            ),
            (frame("subscribe", dict(queue, maxLength="9"), id=6), "payload.maxLength"),
            (
                frame("nack", dict(queue, messageId="m", delay=-2), id=7),
                "payload.delay",
            ),
            (frame("pickup", {}, ttl=0, id=8), "ttl"),
        ]
        for data, field in cases:
            client.send(data)
            [reply] = client.frames()
            self.assertIn(reply["payload"]["code"], ("bad-frame", "bad-name"), reply)
            self.assertIn(field, reply["payload"]["message"])

    def test_nack_requeue_and_dead_letter_frames(self):
        """nack and requeue answer ok; a dead letter arrives saying why and when it died."""
        consumer, admin = self.connect(), self.connect()
        consumer.send(
            frame("subscribe", {"clientId": "driver", "event": "pickup", "prefetch": 1})
        )
        admin.send(frame("pickup", {"n": 1}, to="driver", messageId="p1"))
        self.assertEqual(consumer.frames()[0]["deliveries"], 1)
        nack = {"clientId": "driver", "event": "pickup", "messageId": "p1"}
        consumer.send(frame("nack", nack, id="n1"))
        again, ok = consumer.frames()
        self.assertEqual((again["messageId"], again["deliveries"]), ("p1", 2))
        self.assertEqual(ok["payload"], dict(nack, nacked=True))
        consumer.send(frame("nack", nack))
        self.assertEqual(consumer.frames(), [])
        admin.send(frame("subscribe", {"clientId": "driver", "event": "pickup.dead"}))
        [dead] = admin.frames()
        self.assertEqual((dead["event"], dead["messageId"]), ("pickup.dead", "p1"))
        self.assertEqual(
            dead["deadLetter"],
            {"reason": "max-deliveries", "time": "2023-11-14T22:13:20+00:00"},
        )
        admin.send(frame("unsubscribe", {"clientId": "driver", "event": "pickup.dead"}))
        admin.send(frame("requeue", {"clientId": "driver", "event": "pickup"}, id="r"))
        self.assertEqual(
            admin.frames()[-1]["payload"],
            {"clientId": "driver", "event": "pickup", "requeued": 1},
        )
        [back] = consumer.frames()
        self.assertEqual((back["messageId"], back["deliveries"]), ("p1", 1))
        self.assertNotIn("deadLetter", back)

    def test_queue_full(self):
        """A publish into a full queue gets queue-full with its id; nothing is stored."""
        self.broker.max_queue = 1
        client = self.connect()
        client.send(
            frame("pickup", {}, to="driver", id=1)
            + frame("pickup", {}, to="driver", id=2)
        )
        ok, full = client.frames()
        self.assertEqual(ok["event"], "ok")
        self.assertEqual((full["id"], full["payload"]["code"]), (2, "queue-full"))
        self.assertIn("(driver, pickup)", full["payload"]["message"])

    def test_idle_timeout(self):
        """A client that sends nothing for the idle timeout is told and cut off; its messages go back."""
        quiet, busy = self.connect(), self.connect()
        quiet.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}))
        busy.send(frame("pickup", {}, to="driver", messageId="p1"))
        self.assertEqual(len(quiet.frames()), 1)
        for _ in range(2):
            self.clock.advance(30)
            busy.send(frame("ping"))
        [error] = quiet.frames()
        self.assertEqual(error["payload"]["code"], "idle-timeout")
        # Closed politely, so the goodbye gets there; cut off if it does not.
        self.assertTrue(quiet.transport.disconnecting)
        self.assertFalse(quiet.transport.disconnected)
        self.clock.advance(10)
        self.assertTrue(quiet.transport.disconnected)
        self.assertFalse(busy.transport.disconnecting)
        quiet.close()
        busy.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}))
        self.assertEqual(busy.frames()[-1]["messageId"], "p1")

    def test_send_buffer_full_pauses_deliveries(self):
        """When a connection's send buffer fills, deliveries to it pause until it drains."""
        slow, fast, publisher = self.connect(), self.connect(), self.connect()
        for c in (slow, fast):
            c.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}))
        slow.transport.producer.pauseProducing()
        for n in range(4):
            publisher.send(frame("pickup", {"n": n}, to="driver"))
        self.assertEqual((len(slow.frames()), len(fast.frames())), (0, 4))
        slow.transport.producer.resumeProducing()
        publisher.send(
            frame("pickup", {"n": 4}, to="driver")
            + frame("pickup", {"n": 5}, to="driver")
        )
        self.assertEqual(len(slow.frames()), 1)

    def test_unread_replies_cut_off(self):
        """A client that keeps sending but reads nothing is cut off before its replies pile up."""
        client = self.connect()
        client.transport.producer.pauseProducing()
        pad = "x" * 60_000
        for n in range(200):
            client.send(frame("ping", {"pad": pad}, id=n))
            if client.transport.disconnected:
                break
        self.assertTrue(client.transport.disconnected)
        self.assertLess(len(client.transport.value()), 200 * 60_000)

    def test_store_backlog_throttles_publishers(self):
        """While the store is far behind, the broker stops reading from a publisher until it catches up."""
        store = _SlowStore()
        self.broker = Broker(self.clock, store=store)
        self.addCleanup(self.broker.stop)
        self.factory = BrokerFactory(self.broker, idle_timeout=60)
        client = self.connect()
        client.send(frame("pickup", {}, to="driver", id=1))
        self.assertEqual(client.transport.producerState, "producing")
        store.backlog = 10**6
        client.send(frame("pickup", {}, to="driver", id=2))
        self.assertEqual(client.transport.producerState, "paused")
        # Not being read is not being idle.
        self.clock.advance(3600)
        self.assertFalse(client.transport.disconnecting)
        store.backlog = 0
        store.catch_up()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual([f["id"] for f in client.frames()], [1, 2])

    def test_replies_share_a_wait_per_batch(self):
        """The oks a store batch confirms wait for it together, go out in request order once it is durable, and become errors if it fails."""
        store = _SlowStore()
        self.broker = Broker(self.clock, store=store)
        self.addCleanup(self.broker.stop)
        self.factory = BrokerFactory(self.broker, idle_timeout=60)
        client = self.connect()
        client.send(b"".join(frame("pickup", {}, to="d", id=n) for n in range(5)))
        client.send(frame("ping", {}, id="p"))
        self.assertEqual(client.frames(), [])
        self.assertEqual(store.waits, 1)
        store.catch_up()
        self.assertEqual([f["id"] for f in client.frames()], [0, 1, 2, 3, 4, "p"])
        client.send(frame("pickup", {}, to="d", id=5))
        client.send(frame("pickup", {}, to="d", id=6))
        self.assertEqual(store.waits, 2)
        store.catch_up(StoreUnavailable(UNAVAILABLE))
        self.assertEqual(
            [(f["event"], f["id"], f["payload"]["code"]) for f in client.frames()],
            [("error", 5, "store-unavailable"), ("error", 6, "store-unavailable")],
        )


class _CountingTransport(StringTransport):
    """
    A StringTransport that counts its writes.
    """

    writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


class HeldWritesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock)
        self.factory = BrokerFactory(self.broker, max_line=100)
        self.ports = iter(range(40000, 50000))

    def connect(self):
        return Client(self.factory, next(self.ports), transport=_CountingTransport)

    def test_one_write_per_read(self):
        """The replies and deliveries that one read brings about go out in one write per connection, in order."""
        consumer, producer = self.connect(), self.connect()
        consumer.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}))
        consumer.frames()
        writes = (consumer.transport.writes, producer.transport.writes)
        producer.send(
            b"".join(frame("pickup", {"n": n}, to="driver", id=n) for n in range(20))
        )
        self.assertEqual(
            (consumer.transport.writes, producer.transport.writes),
            (writes[0] + 1, writes[1] + 1),
        )
        self.assertEqual([f["id"] for f in producer.frames()], list(range(20)))
        self.assertEqual(
            [f["payload"]["n"] for f in consumer.frames()], list(range(20))
        )

    def test_outside_a_read_at_once(self):
        """A delivery brought about by time, not by a read, goes out at once."""
        consumer, producer = self.connect(), self.connect()
        consumer.send(
            frame(
                "subscribe",
                {"clientId": "driver", "event": "pickup", "ackTimeout": 5},
            )
        )
        producer.send(frame("pickup", {"n": 1}, to="driver"))
        [first] = consumer.frames()
        self.clock.advance(5)
        [again] = consumer.frames()
        self.assertEqual(
            (again["messageId"], again["redelivered"]), (first["messageId"], True)
        )

    def test_held_replies_before_closing(self):
        """Replies held for the end of a read go out before the error that closes the connection."""
        client = self.connect()
        client.send(
            frame("ping", id=1)
            + frame("ping", id=2)
            + b'{"event":"ping","payload":"'
            + b"y" * 200
            + b'"}\n'
        )
        self.assertEqual(
            [(f["event"], f.get("id")) for f in client.frames()],
            [("pong", 1), ("pong", 2), ("error", None)],
        )
        self.assertTrue(client.transport.disconnecting)

    def test_resumed_deliveries_in_one_write(self):
        """Deliveries held back by a full send buffer go out in one write when it drains."""
        consumer, producer = self.connect(), self.connect()
        consumer.send(frame("subscribe", {"clientId": "driver", "event": "pickup"}))
        consumer.frames()
        consumer.transport.producer.pauseProducing()
        for n in range(5):
            producer.send(frame("pickup", {"n": n}, to="driver"))
        self.assertEqual(consumer.frames(), [])
        writes = consumer.transport.writes
        consumer.transport.producer.resumeProducing()
        self.assertEqual(consumer.transport.writes, writes + 1)
        self.assertEqual([f["payload"]["n"] for f in consumer.frames()], list(range(5)))


class _SlowStore(MemoryStore):
    """
    A memory store that says it is behind until told to catch up.
    """

    backlog = 0

    def __init__(self):
        super().__init__()
        self._waiting = []
        self.waits = 0

    def pending(self):
        return self._waiting

    def flushed(self):
        d = Deferred()
        self._waiting.append(d)
        self.waits += 1
        return d

    def catch_up(self, failure=None):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)
