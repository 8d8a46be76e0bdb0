"""
Integration tests on the real reactor and real loopback TCP (port 0): the
broker in this process, clients and apps connecting through endpoints.
"""

import re

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint

from caps import driver, vendor
from caps.broker import Broker
from caps.client import CapsClient
from caps.protocol import BrokerFactory

TIMEOUT = 20


class TrackingFactory(BrokerFactory):
    """
    A broker factory that remembers its connections, so a test can cut them.
    """

    def __init__(self, broker):
        super().__init__(broker)
        self.protocols = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.protocols.append(protocol)
        return protocol


@pytest.fixture
def server(reactor):
    factory = TrackingFactory(Broker(reactor))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    for protocol in factory.protocols:
        protocol.transport.abortConnection()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def connect(reactor, server):
    made = []

    def make():
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        client = CapsClient(endpoint, reactor)
        client.start()
        made.append(client)
        return client

    yield make
    pytest_twisted.blockon(defer.gatherResults([c.stop(timeout=2) for c in made]))


class Collector:
    """
    A handler that collects deliveries; C{reached(n)} fires once n arrived.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.items = []
        self._waiting = []

    def __call__(self, item):
        self.items.append(item)
        for waiter in list(self._waiting):
            if len(self.items) >= waiter[0]:
                self._waiting.remove(waiter)
                waiter[1].callback(None)

    def reached(self, n):
        if len(self.items) >= n:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append((n, d))
        return d.addTimeout(TIMEOUT, self.reactor)


def caught_up(reactor, client, client_id, event, handler, **kw):
    """
    Subscribe, and fire once the broker has the subscription.
    """
    d = defer.Deferred()
    client.subscribe(
        client_id,
        event,
        handler,
        on_caught_up=lambda n: d.called or d.callback(n),
        **kw,
    )
    return d.addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_competing_consumers_over_tcp(reactor, connect):
    """Over real sockets, 100 messages shared by two consumers go each to exactly one."""
    seen = Collector(reactor)
    a, b, publisher = connect(), connect(), connect()
    await caught_up(reactor, a, "driver", "pickup", lambda d: seen(("a", d.message_id)))
    await caught_up(reactor, b, "driver", "pickup", lambda d: seen(("b", d.message_id)))
    confirms = [publisher.publish("pickup", {"n": n}, to="driver") for n in range(100)]
    ids = [r["messageId"] for r in await defer.gatherResults(confirms)]
    await seen.reached(100)
    got = {name: [m for n, m in seen.items if n == name] for name in "ab"}
    assert sorted(got["a"] + got["b"]) == sorted(ids)
    assert not set(got["a"]) & set(got["b"])
    assert got["a"] and got["b"]


@pytest_twisted.ensureDeferred
async def test_fan_out_over_tcp(reactor, connect):
    """Each addressee and each observer gets its own copy."""
    acme, flowers, logger = Collector(reactor), Collector(reactor), Collector(reactor)
    await caught_up(reactor, connect(), "acme", "delivered", acme)
    await caught_up(reactor, connect(), "flowers", "delivered", flowers)
    await caught_up(reactor, connect(), "logger", "delivered", logger)
    result = await connect().publish("delivered", {"x": "é"}, to=["acme", "flowers"])
    assert result["queues"] == 3
    await defer.gatherResults([acme.reached(1), flowers.reached(1), logger.reached(1)])
    assert {c.items[0].client_id for c in (acme, flowers, logger)} == {
        "acme",
        "flowers",
        "logger",
    }
    assert {c.items[0].payload["x"] for c in (acme, flowers, logger)} == {"é"}


@pytest_twisted.ensureDeferred
async def test_broker_drops_everyone(reactor, connect, server):
    """When the broker cuts every connection mid-stream, clients reconnect and nothing is lost or handled twice."""
    seen = Collector(reactor)
    consumer, publisher = connect(), connect()
    await caught_up(reactor, consumer, "acme", "delivered", seen)
    confirms = [publisher.publish("delivered", {"n": n}, to="acme") for n in range(200)]
    await seen.reached(20)
    assert len(seen.items) < 200
    for protocol in server.protocols:
        protocol.transport.abortConnection()
    await defer.gatherResults(confirms).addTimeout(TIMEOUT, reactor)
    await seen.reached(200)
    assert sorted(d.payload["n"] for d in seen.items) == list(range(200))
    # stop() waits for every acknowledgement to be confirmed.
    await consumer.stop()
    assert len(server.broker.queue("acme", "delivered")) == 0


@pytest_twisted.ensureDeferred
async def test_apps_over_tcp(reactor, server):
    """A vendor and a driver app complete their orders over a real socket."""
    out = []

    def client():
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        c = CapsClient(endpoint, reactor)
        c.start()
        return c

    shop_client, ann_client = client(), client()
    shop = vendor.Vendor(
        shop_client, "acme-widgets", reactor, out.append, interval=0.05, orders=5
    )
    ann = driver.Driver(ann_client, "ann", reactor, out.append, delay=0.05)
    shop.start()
    ann.start()
    try:
        await shop.done.addTimeout(TIMEOUT, reactor)
    finally:
        await defer.gatherResults([shop_client.stop(), ann_client.stop()])
    placed = [
        m.group(1) for m in map(re.compile(r"placed order (\S+)").search, out) if m
    ]
    thanked = [
        m.group(1)
        for m in map(re.compile(r"Thank you for delivering (\S+)").search, out)
        if m
    ]
    assert len(placed) == 5
    assert sorted(thanked) == sorted(placed)
