"""
Tests for caps.rotating.RotatingEndpoint: alone, against fake endpoints, and
under a L{CapsClient} moving between two brokers in memory, with time driven
by a fake clock; and once over real TLS on the real reactor.

The module-level test runs under pytest-twisted (trial collects none of
them); the classes run under both trial and pytest.
"""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IHandshakeListener,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from caps.broker import Broker
from caps.client import CapsClient
from caps.rotating import RotatingEndpoint

from .certs import make_certificates
from .helpers import MemoryNetwork
from .test_integration import TIMEOUT, Collector, caught_up
from .test_tls import TrackingFactory, ssl_listen, tls_connect


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    An endpoint whose connection attempts the test ends by hand.
    """

    def __init__(self, name, tried):
        self.name = name
        # Shared by the endpoints: the name of each one tried, in order
        self.tried = tried
        # (factory, Deferred) of each attempt
        self.attempts = []

    def connect(self, factory):
        d = defer.Deferred()
        self.tried.append(self.name)
        self.attempts.append((factory, d))
        return d

    def succeed(self):
        """
        Make the last attempt succeed, and return the protocol it built.
        """
        factory, d = self.attempts[-1]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        d.callback(protocol)
        return protocol

    def fail(self):
        self.attempts[-1][1].errback(Failure(ConnectionRefusedError()))


class Recorder(Protocol):
    def __init__(self):
        self.lost = []

    def connectionLost(self, reason):
        self.lost.append(reason)


@implementer(IHandshakeListener)
class HandshakeRecorder(Recorder):
    handshakes = 0

    def handshakeCompleted(self):
        self.handshakes += 1


class RotatingEndpointTests(SynchronousTestCase):
    def setUp(self):
        self.tried = []
        self.endpoints = [FakeEndpoint(name, self.tried) for name in "abc"]
        self.events = []
        self.rotating = RotatingEndpoint(self.endpoints, names=["A", "B", "C"])
        self.rotating.log = Logger(observer=self.events.append)
        self.factory = Factory.forProtocol(Recorder)

    def fail_next(self):
        """
        Try to connect, and make the attempt fail.
        """
        d = self.rotating.connect(self.factory)
        self.endpoints[self.rotating.current].fail()
        self.failureResultOf(d, ConnectionRefusedError)

    def test_is_an_endpoint(self):
        """A RotatingEndpoint provides IStreamClientEndpoint."""
        verifyObject(IStreamClientEndpoint, self.rotating)

    def test_needs_endpoints(self):
        """An empty list of endpoints, or names that do not match them, are refused."""
        self.assertRaises(ValueError, RotatingEndpoint, [])
        self.assertRaises(ValueError, RotatingEndpoint, self.endpoints, names=["A"])

    def test_rotates_on_failures(self):
        """Each failed attempt sends the next one to the next endpoint, in order."""
        for _ in range(2):
            self.fail_next()
        self.rotating.connect(self.factory)
        self.assertEqual(self.tried, ["a", "b", "c"])

    def test_wraps_around(self):
        """After the last endpoint fails, the first is tried again."""
        for _ in range(4):
            self.fail_next()
        self.rotating.connect(self.factory)
        self.assertEqual(self.tried, ["a", "b", "c", "a", "b"])

    def test_lost_connection_moves_on(self):
        """While a connection is up the endpoint stays put; once it is lost, the next attempt goes to the next endpoint."""
        d = self.rotating.connect(self.factory)
        wrapper = self.endpoints[0].succeed()
        # The caller gets its own factory's protocol, not the wrapper.
        protocol = self.successResultOf(d)
        self.assertIsInstance(protocol, Recorder)
        self.assertIs(protocol.transport, wrapper.transport)
        self.assertEqual(self.rotating.current, 0)
        wrapper.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(protocol.lost), 1)
        self.rotating.connect(self.factory)
        self.assertEqual(self.tried, ["a", "b"])

    def test_stale_loss_does_not_skip(self):
        """A connection lost after the endpoint already moved on (its attempt overlapped a failed one) does not move it again."""
        first = self.rotating.connect(self.factory)
        self.rotating.connect(self.factory)
        self.endpoints[0].attempts[0][1].errback(Failure(ConnectionRefusedError()))
        self.failureResultOf(first)
        self.assertEqual(self.rotating.current, 1)
        wrapper = self.endpoints[0].succeed()
        wrapper.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.rotating.current, 1)

    def test_one_endpoint(self):
        """With one endpoint, every attempt goes to it."""
        endpoint = FakeEndpoint("only", self.tried)
        rotating = RotatingEndpoint([endpoint])
        rotating.log = Logger(observer=self.events.append)
        for _ in range(3):
            d = rotating.connect(self.factory)
            endpoint.fail()
            self.failureResultOf(d, ConnectionRefusedError)
        rotating.connect(self.factory)
        self.assertEqual(self.tried, ["only"] * 4)

    def test_handshake_listener_passes_through(self):
        """A protocol that waits for the TLS handshake still gets it through the wrapper (and one that does not, does not claim to)."""
        self.rotating.connect(Factory.forProtocol(HandshakeRecorder))
        wrapper = self.endpoints[0].succeed()
        self.assertTrue(IHandshakeListener.providedBy(wrapper))
        wrapper.handshakeCompleted()
        self.assertEqual(wrapper._rotating_protocol.handshakes, 1)
        self.rotating.connect(self.factory)
        plain = self.endpoints[0].succeed()
        self.assertFalse(IHandshakeListener.providedBy(plain))

    def test_logs_which_broker(self):
        """The log names the broker connected to, the one that failed or was lost, and the next one."""
        self.fail_next()
        self.rotating.connect(self.factory)
        protocol = self.endpoints[1].succeed()
        protocol.connectionLost(Failure(ConnectionDone()))
        said = [
            (e["log_format"].split(" ")[0], e["broker"], e.get("next"))
            for e in self.events
        ]
        self.assertEqual(
            said,
            [
                ("connecting", "A", None),
                ("could", "A", "B"),
                ("connecting", "B", None),
                ("connected", "B", None),
                ("lost", "B", "C"),
            ],
        )


class TwoBrokers(MemoryNetwork):
    """
    A L{MemoryNetwork} with a second broker, B, on another port of the
    same reactor (each with a store of its own).
    """

    PORT_B = 3001
    DEAD_PORT = 3999

    def __init__(self):
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from caps.protocol import BrokerFactory

        super().__init__()
        self.broker_b = Broker(self.reactor)
        TCP4ServerEndpoint(self.reactor, self.PORT_B).listen(
            BrokerFactory(self.broker_b)
        )

    def endpoint_to(self, port):
        from twisted.internet.endpoints import TCP4ClientEndpoint

        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", port)

    def rotating(self, *ports):
        return RotatingEndpoint(
            [self.endpoint_to(port) for port in ports],
            names=[f"tcp:127.0.0.1:{port}" for port in ports],
        )

    def broker_of(self, pump):
        return pump.server.factory.broker


class FailoverTests(SynchronousTestCase):
    """
    A L{CapsClient} on a L{RotatingEndpoint} moving from broker A to B.
    """

    def setUp(self):
        self.net = TwoBrokers()

    def client(self, *ports):
        client = CapsClient(self.net.rotating(*ports), self.net.reactor)
        client.start()
        self.net.complete()
        return client

    def test_first_failure_tries_next_promptly(self):
        """When the first broker refuses the connection, the next is tried after the back-off's first, shortest delay."""
        client = self.client(TwoBrokers.DEAD_PORT, TwoBrokers.PORT_B)
        self.assertFalse(client.connected)
        [attempt] = self.net.reactor.tcpClients
        self.assertEqual(attempt[1], TwoBrokers.DEAD_PORT)
        self.net._completer.failOnce(Failure(ConnectionRefusedError()))
        [retry] = self.net.reactor.getDelayedCalls()
        # 0.5 s x 1.5 plus up to 1 s of jitter
        self.assertLess(retry.getTime() - self.net.reactor.seconds(), 1.75)
        self.net.advance(1.75)
        self.assertTrue(client.connected)
        [pump] = self.net.pumps
        self.assertIs(self.net.broker_of(pump), self.net.broker_b)

    def test_lost_connection_goes_to_next_broker(self):
        """When the connection to A is lost, the client reconnects to B, and after B to A again."""
        client = self.client(MemoryNetwork.PORT, TwoBrokers.PORT_B)
        brokers = []
        for _ in range(3):
            self.assertTrue(client.connected)
            [pump] = self.net.pumps
            brokers.append(self.net.broker_of(pump))
            self.net.drop(pump)
            self.assertFalse(client.connected)
            self.net.advance(2)
        self.assertEqual(brokers, [self.net.broker, self.net.broker_b, self.net.broker])

    def test_unconfirmed_publish_and_subscription_move(self):
        """A publish A never confirmed is re-sent to B with its messageId, and the client's subscription is made again on B."""
        client = self.client(MemoryNetwork.PORT, TwoBrokers.PORT_B)
        seen = []
        client.subscribe("acme", "delivered", seen.append)
        self.net.flush()
        d = client.publish("pickup", {"n": 1}, to="driver", message_id="p1")
        [pump] = self.net.pumps
        pump.pump()  # A takes the publish and answers ...
        self.net.drop(pump, lose_pending=True)  # ... but the answer is lost.
        self.assertNoResult(d)
        self.net.advance(2)
        self.assertTrue(client.connected)
        [pump] = self.net.pumps
        self.assertIs(self.net.broker_of(pump), self.net.broker_b)
        self.assertEqual(self.successResultOf(d), {"messageId": "p1", "queues": 1})
        [entry] = self.net.broker_b.queue("driver", "pickup").entries()
        self.assertEqual(entry.message.id, "p1")
        # Another client of B's publishes to acme: the moved subscription
        # gets it.
        other = CapsClient(self.net.endpoint_to(TwoBrokers.PORT_B), self.net.reactor)
        other.start()
        self.net.complete()
        other.publish("delivered", {"n": 2}, to="acme", message_id="d2")
        self.net.flush()
        self.assertEqual([m.message_id for m in seen], ["d2"])
        self.assertEqual(len(self.net.broker_b.queue("acme", "delivered")), 0)
        self.assertTrue(client._is_idle())


@pytest.fixture
def tls_broker(reactor, tmp_path):
    """
    A broker (memory store) behind an C{ssl:} endpoint on 127.0.0.1, and
    the certificates its clients trust.
    """
    certs = make_certificates(str(tmp_path / "certs"))
    factory = TrackingFactory(Broker(reactor))
    endpoint = serverFromString(reactor, ssl_listen(certs))
    port = pytest_twisted.blockon(endpoint.listen(factory))
    yield port.getHost().port, certs, factory
    for p in list(factory.open):
        p.transport.abortConnection()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def dead_port():
    """
    A loopback port bound but not listening: connections to it are refused.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_tls_after_a_dead_broker(reactor, tls_broker, dead_port):
    """Over real TLS, a client whose first broker refuses connects to the second, counts as connected only after the handshake, and subscribes and publishes there."""
    port, certs, factory = tls_broker
    descriptions = [
        tls_connect(dead_port, certs.ca_dir),
        tls_connect(port, certs.ca_dir),
    ]
    endpoint = RotatingEndpoint(
        [clientFromString(reactor, d) for d in descriptions], names=descriptions
    )
    client = CapsClient(endpoint, reactor, retry_policy=lambda attempt: 0.05)
    client.start()
    try:
        seen = Collector(reactor)
        await caught_up(reactor, client, "acme", "delivered", seen)
        result = await client.publish("delivered", {"n": 1}, to="acme").addTimeout(
            TIMEOUT, reactor
        )
        assert result["queues"] == 1
        await seen.reached(1)
        assert endpoint.current == 1
        [server_side] = factory.protocols
        assert ISSLTransport.providedBy(server_side.transport)
        # The broker saw the handshake finish: no timer left to cut it off.
        assert server_side._handshake_timer is None
    finally:
        await client.stop(timeout=2)
