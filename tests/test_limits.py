"""
The limits on what one client may cost the broker: connections in all and
per address, subscriptions and unacknowledged messages per connection,
payload size, frame rate, and time to finish a line.
"""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from caps.broker import Broker
from caps.limits import Limits
from caps.protocol import CLOSE_GRACE, BrokerFactory

from .test_protocol import Client, frame


class _LimitCase(SynchronousTestCase):
    def make(self, broker_args=None, **limits):
        self.clock = Clock()
        self.broker = Broker(self.clock, **(broker_args or {}))
        self.factory = BrokerFactory(self.broker, limits=Limits(**limits))
        self.ports = iter(range(40000, 50000))

    def connect(self, host="127.0.0.1"):
        return Client(self.factory, next(self.ports), host)

    def codes(self, client):
        return [
            f["payload"]["code"] if f["event"] == "error" else f["event"]
            for f in client.frames()
        ]


class ConnectionLimitTests(_LimitCase):
    def test_total(self):
        """Past --max-connections a new connection gets too-many-connections and is closed; a closed one frees its place."""
        self.make(max_connections=2, max_per_address=10)
        a, b = self.connect("10.0.0.1"), self.connect("10.0.0.2")
        c = self.connect("10.0.0.3")
        [refusal] = c.frames()
        self.assertEqual(refusal["payload"]["code"], "too-many-connections")
        self.assertTrue(c.transport.disconnecting)
        c.send(frame("ping", id=1))
        self.assertEqual(c.frames(), [])
        c.close()
        a.close()
        d = self.connect("10.0.0.3")
        d.send(frame("ping", id=1))
        self.assertEqual(self.codes(d), ["pong"])
        b.send(frame("ping", id=1))
        self.assertEqual(self.codes(b), ["pong"])

    def test_per_address(self):
        """Past --max-connections-per-address one address is refused while others still connect."""
        self.make(max_connections=100, max_per_address=2)
        for _ in range(2):
            self.connect("10.0.0.1")
        refused = self.connect("10.0.0.1")
        self.assertEqual(self.codes(refused), ["too-many-connections"])
        other = self.connect("10.0.0.2")
        self.assertEqual(other.frames(), [])
        self.assertFalse(other.transport.disconnecting)
        # The refused connection is cut off if it does not go.
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(refused.transport.disconnected)


class PerConnectionLimitTests(_LimitCase):
    def test_subscriptions(self):
        """A connection may consume at most --max-subscriptions queues; renewing one it has is fine."""
        self.make(broker_args={"max_subscriptions": 2})
        client = self.connect()
        for event in ("a", "b", "a", "c"):
            client.send(frame("subscribe", {"clientId": "q", "event": event}, id=event))
        self.assertEqual(
            self.codes(client), ["ok", "ok", "ok", "too-many-subscriptions"]
        )
        client.send(frame("unsubscribe", {"clientId": "q", "event": "a"}, id=1))
        client.send(frame("subscribe", {"clientId": "q", "event": "c"}, id=2))
        self.assertEqual(self.codes(client), ["ok", "ok"])

    def test_unacked(self):
        """At most --max-unacked messages are in flight to one connection over all its subscriptions and getAlls, and more follow as it acknowledges."""
        self.make(broker_args={"max_unacked": 3})
        for n in range(4):
            for event in ("a", "b"):
                self.broker.publish(event, {}, json.dumps({"n": n}).encode(), ("q",))
        client = self.connect()
        seen = []

        def sent():
            frames = client.frames()
            seen.extend(frames)
            return [f for f in frames if "messageId" in f]

        def ack(message):
            payload = {"clientId": "q", "event": message["event"]}
            payload["messageId"] = message["messageId"]
            client.send(frame("received", payload))

        client.send(frame("subscribe", {"clientId": "q", "event": "a"}, id=1))
        client.send(frame("getAll", {"clientId": "q", "event": "b"}, id=2))
        in_flight = sent()
        self.assertEqual(len(in_flight), 3)
        # Each acknowledgement lets one more out, until all 8 have gone.
        for _ in range(5):
            ack(in_flight.pop(0))
            more = sent()
            self.assertEqual(len(more), 1)
            in_flight.extend(more)
        for message in in_flight:
            ack(message)
        self.assertEqual(sent(), [])
        delivered = [(f["event"], f["payload"]["n"]) for f in seen if "messageId" in f]
        self.assertEqual(
            sorted(delivered), [(e, n) for e in ("a", "b") for n in range(4)]
        )
        # The getAll's answer came once its last message was sent.
        self.assertIn(2, [f.get("id") for f in seen])
        self.assertEqual(
            len(self.broker.queue("q", "a")) + len(self.broker.queue("q", "b")), 0
        )

    def test_payload(self):
        """A payload over --max-payload bytes gets payload-too-large and is not queued."""
        self.make(max_payload=20)
        client = self.connect()
        client.send(frame("e", {"x": "a" * 12}, to="q", id=1))
        client.send(frame("e", {"x": "a" * 13}, to="q", id=2))
        self.assertEqual(self.codes(client), ["ok", "payload-too-large"])
        self.assertEqual(len(self.broker.queue("q", "e")), 1)


class RateLimitTests(_LimitCase):
    def test_burst_then_refused(self):
        """A second's worth of frames goes through at once; the next gets rate-limited with its id, and the frames after it wait instead of being lost."""
        self.make(rate=10)
        client = self.connect()
        data = b"".join(frame("ping", id=n) for n in range(15))
        client.send(data)
        replies = client.frames()
        self.assertEqual([r["event"] for r in replies], ["pong"] * 10 + ["error"])
        self.assertEqual(replies[-1]["payload"]["code"], "rate-limited")
        self.assertEqual(replies[-1]["id"], 10)
        self.assertEqual(client.transport.producerState, "paused")
        # More bytes arriving meanwhile (a transport may still hand them
        # over) wait too.
        client.send(frame("ping", id=15))
        self.assertEqual(client.frames(), [])
        self.clock.advance(0.1)
        replies = client.frames()
        self.assertEqual(replies[0], {"event": "pong", "payload": {}, "id": 11})
        # One frame a tenth of a second: 11 came through, 12 was refused.
        self.assertEqual(replies[1]["payload"]["code"], "rate-limited")
        for _ in range(40):
            self.clock.advance(0.1)
        # Still over the rate: one frame refused each time reading stops,
        # so the frames handled keep to the rate.
        self.assertEqual(
            [(r["id"], r["event"]) for r in client.frames()],
            [(13, "pong"), (14, "error"), (15, "pong")],
        )
        self.assertEqual(client.transport.producerState, "producing")

    def test_steady_rate_passes(self):
        """A client that keeps to the rate is never refused."""
        self.make(rate=10)
        client = self.connect()
        for n in range(50):
            client.send(frame("ping", id=n))
            self.clock.advance(0.1)
        self.assertEqual(self.codes(client), ["pong"] * 50)

    def test_off(self):
        """--max-rate 0 refuses nothing."""
        self.make(rate=0)
        client = self.connect()
        client.send(b"".join(frame("ping", id=n) for n in range(5000)))
        self.assertEqual(self.codes(client), ["pong"] * 5000)


class LineTimeoutTests(_LimitCase):
    def test_slowloris(self):
        """A client that starts a line and trickles it slower than --line-timeout is closed with line-timeout."""
        self.make(line_timeout=10)
        client = self.connect()
        client.send(b'{"event":')
        for _ in range(9):
            self.clock.advance(1)
            client.send(b" ")
        self.assertFalse(client.transport.disconnecting)
        self.clock.advance(1)
        [reply] = client.frames()
        self.assertEqual(reply["payload"]["code"], "line-timeout")
        self.assertTrue(client.transport.disconnecting)

    def test_lines_finished_in_time(self):
        """Lines each finished within the timeout keep the connection, however long it lasts."""
        self.make(line_timeout=10)
        client = self.connect()
        for n in range(10):
            client.send(b'{"event":"ping",')
            self.clock.advance(6)
            client.send(b'"id":%d}\n{"event":' % n)
            self.clock.advance(6)
            client.send(b'"ping"}\n')
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(self.codes(client), ["pong"] * 20)
        client.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def tls_connect(self):
        """
        A connection whose transport looks like TLS to the protocol.
        """
        client = Client.__new__(Client)
        address = IPv4Address("TCP", "127.0.0.1", next(self.ports))
        client.protocol = self.factory.buildProtocol(address)
        client.transport = StringTransport(peerAddress=address)
        directlyProvides(client.transport, ISSLTransport)
        client.protocol.makeConnection(client.transport)
        return client

    def test_tls_handshake(self):
        """A TLS client that does not finish its handshake within the line timeout is cut off; one that does is kept."""
        self.make(line_timeout=10)
        stalled, finished = self.tls_connect(), self.tls_connect()
        self.clock.advance(5)
        finished.protocol.handshakeCompleted()
        self.clock.advance(5)
        self.assertTrue(stalled.transport.disconnected)
        self.assertFalse(finished.transport.disconnecting)
        finished.send(frame("ping", id=1))
        self.assertEqual(self.codes(finished), ["pong"])
