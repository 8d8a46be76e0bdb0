"""
TLS: the broker behind an C{ssl:} server endpoint, and clients through
C{tls:} client endpoints that verify its certificate, on the real reactor
and real loopback sockets (127.0.0.1, port 0).  The certificates are made
during the run (tests/certs.py); no private key is committed.

The module-level tests run under pytest-twisted (trial collects none of
them); L{TwistdTLSTests} runs C{twistd -n caps-broker} as a process and
runs under both trial and pytest.
"""

import os
import re
import socket
import ssl
import tempfile

import pytest
import pytest_twisted
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, protocol
from twisted.internet.endpoints import (
    clientFromString,
    connectProtocol,
    quoteStringArgument,
    serverFromString,
)
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.client import CapsClient
from caps.demo import LISTENING
from caps.protocol import BrokerFactory, BrokerProtocol

from .certs import make_certificates
from .processes import RunningBroker, read, send
from .test_integration import TIMEOUT, Collector, caught_up


def q(value):
    """
    Quote a path for an endpoint description (C{:} and C{\\} are special).
    """
    return quoteStringArgument(value)


def ssl_listen(certs, port=0):
    return (
        f"ssl:{port}:interface=127.0.0.1"
        f":privateKey={q(certs.server_key)}:certKey={q(certs.server_cert)}"
    )


def tls_connect(port, trust_dir, host="127.0.0.1"):
    """
    A C{tls:} description for the broker on 127.0.0.1:C{port}, verified as
    C{host}: for a name other than 127.0.0.1 the TCP connection still goes
    to 127.0.0.1 (the C{endpoint=} argument) and C{host} is only checked
    against the certificate.
    """
    description = f"tls:{host}:{port}:trustRoots={q(trust_dir)}"
    if host != "127.0.0.1":
        description += ":endpoint=" + q(f"tcp:127.0.0.1:{port}")
    return description


class TrackedProtocol(BrokerProtocol):
    def connectionLost(self, reason):
        self.factory.open.discard(self)
        super().connectionLost(reason)


class TrackingFactory(BrokerFactory):
    """
    A broker factory that remembers every connection it made, and which
    are still open (a TLS transport cannot be aborted once it is closed).
    """

    protocol = TrackedProtocol

    def __init__(self, broker):
        super().__init__(broker)
        self.protocols = []
        self.open = set()

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        self.protocols.append(p)
        self.open.add(p)
        return p


@pytest.fixture
def certs(tmp_path):
    return make_certificates(str(tmp_path / "certs"))


@pytest.fixture
def other_certs(tmp_path):
    return make_certificates(str(tmp_path / "other"), ca_name="Some other CA")


@pytest.fixture
def server(reactor, certs):
    """
    A broker (memory store) listening on an C{ssl:} endpoint.
    """
    factory = TrackingFactory(Broker(reactor))
    endpoint = serverFromString(reactor, ssl_listen(certs))
    port = pytest_twisted.blockon(endpoint.listen(factory))
    factory.port = port.getHost().port
    yield factory
    for p in list(factory.open):
        p.transport.abortConnection()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def connect(reactor):
    """
    Make started L{CapsClient}s from client endpoint descriptions; each is
    stopped at the end of the test.
    """
    made = []

    def make(description):
        client = CapsClient(clientFromString(reactor, description), reactor)
        client.start()
        made.append(client)
        return client

    yield make
    pytest_twisted.blockon(defer.gatherResults([c.stop(timeout=2) for c in made]))


@pytest_twisted.ensureDeferred
async def test_subscribe_and_receive_over_tls(reactor, server, certs, connect):
    """A message published over one verified TLS connection reaches a subscriber on another, both verified by IP and by DNS name."""
    seen = Collector(reactor)
    consumer = connect(tls_connect(server.port, certs.ca_dir, host="localhost"))
    await caught_up(reactor, consumer, "acme", "delivered", seen)
    publisher = connect(tls_connect(server.port, certs.ca_dir))
    result = await publisher.publish("delivered", {"orderId": "o1"}, to="acme")
    assert result["queues"] == 1
    await seen.reached(1)
    assert [(d.client_id, d.payload) for d in seen.items] == [
        ("acme", {"orderId": "o1"})
    ]
    assert len(server.protocols) == 2
    assert all(ISSLTransport.providedBy(p.transport) for p in server.protocols)
    # The broker saw each handshake finish: no timer left to cut them off.
    assert [p._handshake_timer for p in server.protocols] == [None, None]


class Recorder(protocol.Protocol):
    """
    Sends a ping as soon as it is connected, and records what comes back
    and why the connection ended.
    """

    def __init__(self):
        self.received = b""
        self.reason = None
        self.line = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b'{"event":"ping","id":1}\n')

    def dataReceived(self, data):
        self.received += data
        if b"\n" in self.received and not self.line.called:
            self.line.callback(self.received)

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


async def connect_recorder(reactor, description):
    recorder = Recorder()
    await connectProtocol(clientFromString(reactor, description), recorder)
    return recorder


@pytest_twisted.ensureDeferred
async def test_raw_tls_ping(reactor, server, certs):
    """A bare TLS connection that trusts the broker's CA gets its pong: the control for the refusals below."""
    recorder = await connect_recorder(reactor, tls_connect(server.port, certs.ca_dir))
    line = await recorder.line.addTimeout(TIMEOUT, reactor)
    assert line == b'{"event":"pong","payload":{},"id":1}\n'
    recorder.transport.loseConnection()
    await recorder.lost.addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_other_ca_fails_handshake(reactor, server, other_certs):
    """A client that trusts another CA fails the TLS handshake with an SSL error and never gets a frame."""
    recorder = await connect_recorder(
        reactor, tls_connect(server.port, other_certs.ca_dir)
    )
    await recorder.lost.addTimeout(TIMEOUT, reactor)
    reason = recorder.reason
    assert reason.check(SSL.Error), reason
    assert "certificate verify failed" in str(reason.value)
    assert recorder.received == b""


@pytest_twisted.ensureDeferred
async def test_name_not_in_certificate_fails(reactor, server, certs):
    """A client that trusts the CA but expects a name the certificate does not carry is refused, and never gets a frame."""
    recorder = await connect_recorder(
        reactor, tls_connect(server.port, certs.ca_dir, host="broker.example")
    )
    await recorder.lost.addTimeout(TIMEOUT, reactor)
    reason = recorder.reason
    assert reason.check(VerificationError), reason
    assert recorder.received == b""


@pytest_twisted.ensureDeferred
async def test_caps_client_with_other_ca_gets_nothing_through(
    reactor, server, certs, other_certs, connect
):
    """A CapsClient that trusts another CA never counts as connected, warns of each failed handshake, and its publish never reaches the broker."""
    seen = Collector(reactor)
    trusted = connect(tls_connect(server.port, certs.ca_dir))
    await caught_up(reactor, trusted, "driver", "pickup", seen)
    failures = []
    twice = defer.Deferred()

    def observe(event):
        if event.get("log_format", "").startswith("TLS with the broker failed"):
            failures.append(event)
            if len(failures) == 2 and not twice.called:
                twice.callback(None)

    globalLogPublisher.addObserver(observe)
    try:
        refused = connect(tls_connect(server.port, other_certs.ca_dir))
        confirmed = refused.publish("pickup", {"orderId": "refused"}, to="driver")
        # The first connection and the retry after back-off both fail.
        await twice.addTimeout(TIMEOUT, reactor)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert "certificate verify failed" in str(failures[0]["why"])
    assert not refused.connected
    await trusted.publish("pickup", {"orderId": "trusted"}, to="driver")
    await seen.reached(1)
    assert [d.payload["orderId"] for d in seen.items] == ["trusted"]
    assert not confirmed.called
    # Its publish is still waiting: stop without waiting for it.
    await refused.stop(timeout=0.1)


class TwistdTLSTests(SynchronousTestCase):
    """
    C{twistd -n caps-broker --listen ssl:...} as a process, talked to with
    the standard library's C{ssl} module.
    """

    def setUp(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-tls-")
        self.addCleanup(scratch.cleanup)
        self.certs = make_certificates(os.path.join(scratch.name, "certs"))
        self.context = ssl.create_default_context(cafile=self.certs.ca_cert)

    def start(self, *args):
        broker = RunningBroker("memory", *args, listen=ssl_listen(self.certs))
        self.addCleanup(broker.stop)
        return broker

    def tls_connect(self, address):
        """
        A verified TLS connection to C{address} (host, port) and a reader.
        """
        raw = socket.create_connection(address, timeout=10)
        self.addCleanup(raw.close)
        sock = self.context.wrap_socket(raw, server_hostname=address[0])
        self.addCleanup(sock.close)
        return sock, sock.makefile("rb")

    def test_ping_over_tls(self):
        """twistd -n caps-broker --listen ssl:... answers a ping over a TLS connection verified against the test CA."""
        broker = self.start()
        sock, reader = self.tls_connect(broker.address)
        self.assertIn(sock.version(), ("TLSv1.2", "TLSv1.3"))
        send(sock, {"event": "ping", "id": 1})
        self.assertEqual(read(reader), {"event": "pong", "payload": {}, "id": 1})

    def test_plain_client_on_tls_port(self):
        """A client that speaks plain JSON to the TLS port gets no frame back and is disconnected, and a client without the CA is refused."""
        broker = self.start()
        plain = socket.create_connection(broker.address, timeout=10)
        self.addCleanup(plain.close)
        plain.sendall(b'{"event":"ping","id":1}\n')
        received, closed = b"", False
        for _ in range(100):
            try:
                chunk = plain.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = True
                break
            received += chunk
        self.assertTrue(closed)
        self.assertNotIn(b"pong", received)
        untrusting = ssl.create_default_context()
        raw = socket.create_connection(broker.address, timeout=10)
        self.addCleanup(raw.close)
        with self.assertRaises(ssl.SSLCertVerificationError):
            untrusting.wrap_socket(raw, server_hostname="127.0.0.1")

    def test_tcp_and_tls_listeners_together(self):
        """One broker listens on TLS and plain TCP at once, and a message published over TCP reaches a subscriber on TLS."""
        broker = self.start("--listen", "tcp:0:interface=127.0.0.1")
        # The second listener logs its address right after the first.
        broker.wait_for(re.compile(f"{LISTENING.pattern}(.|\n)*{LISTENING.pattern}"))
        addresses = LISTENING.findall(broker.text())
        self.assertEqual(len(addresses), 2, broker.text())
        host, port = addresses[1].rsplit(":", 1)
        tls, tls_in = self.tls_connect(broker.address)
        send(
            tls,
            {
                "event": "subscribe",
                "id": 1,
                "payload": {"clientId": "acme", "event": "delivered"},
            },
        )
        self.assertEqual(read(tls_in)["event"], "ok")
        tcp = socket.create_connection((host, int(port)), timeout=10)
        self.addCleanup(tcp.close)
        tcp_in = tcp.makefile("rb")
        send(
            tcp,
            {
                "event": "delivered",
                "to": "acme",
                "id": 2,
                "payload": {"orderId": "o1"},
            },
        )
        self.assertEqual(read(tcp_in)["payload"]["queues"], 1)
        delivery = read(tls_in)
        self.assertEqual(
            (delivery["event"], delivery["payload"]), ("delivered", {"orderId": "o1"})
        )
