"""
C{python -m caps.bench.loopback}: a broker (or a bare relay), a producer
and a consumer in one process, on one reactor, over loopback TCP.

For comparing two versions of the broker where the benchmark's figures
are too noisy to: run it under callgrind, which counts instructions
rather than time, at two sizes, and the difference over the difference
in messages is the instructions per message, whatever else the machine
is doing::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m caps.bench.loopback --messages 5000
    valgrind ... python -m caps.bench.loopback --messages 25000
    (Collected at 25,000 - Collected at 5,000) / 20,000

The count covers the producer and the consumer too (the same in every
version), and the event log is off.  The producer keeps up to C{--window}
publishes unconfirmed, as the benchmark's does; the consumer acknowledges
every delivery.  C{--store sqlite-full} or C{sqlite-normal} puts the
broker on an SQLite file in a temporary directory (its writer thread is
counted too); C{--catch-up} has every message published and confirmed
before the consumer subscribes, as the benchmark's catch-up does.
Without callgrind it prints the process's CPU time per message, for a
quick look.
"""

import os
import shutil
import sys
import tempfile
import time

from twisted.internet import protocol
from twisted.python import usage

from caps.bench import load

# --store: the broker's store, and SQLite's synchronous setting
STORES = {"memory": None, "sqlite-full": "full", "sqlite-normal": "normal"}


class Options(usage.Options):
    optParameters = [
        ["messages", "n", 20_000, "Messages to publish and acknowledge.", int],
        ["window", "w", 1000, "Unconfirmed publishes in flight.", int],
        ["store", "s", "memory", "memory, sqlite-full or sqlite-normal."],
    ]
    optFlags = [
        ["relay", None, "The bare fast relay instead of the broker."],
        ["catch-up", None, "Publish everything before the consumer subscribes."],
    ]

    def postOptions(self):
        if self["store"] not in STORES:
            raise usage.UsageError(f"--store: one of {', '.join(STORES)}")


class _Lines(protocol.Protocol):
    _rest = b""

    def dataReceived(self, data):
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        self.lines(lines)


class _Consumer(_Lines):
    def __init__(self, run):
        self.run = run

    def connectionMade(self):
        self.transport.write(load.SUBSCRIBE % load.QUEUE)

    def lines(self, lines):
        acks = []
        for line in lines:
            if line.startswith(b'{"event":"ok"'):
                # The subscription.
                self.run.subscribed()
                continue
            found = load.MESSAGE_ID.search(line)
            if found is not None:
                acks.append(load.ACK_HEAD + found.group(1) + load.ACK_TAIL)
        if acks:
            self.transport.write(b"".join(acks))
            self.run.acknowledged(len(acks))


class _Producer(_Lines):
    def __init__(self, run):
        self.run = run

    def connectionMade(self):
        self.send()

    def send(self):
        run = self.run
        count = min(run.window - (run.sent - run.confirmed), run.messages - run.sent)
        if count > 0:
            self.transport.write(
                b"".join(load.PUBLISH % (run.sent + i + 1, 0) for i in range(count))
            )
            run.sent += count

    def lines(self, lines):
        run = self.run
        run.confirmed += sum(1 for line in lines if line.startswith(b'{"event":"ok"'))
        self.send()
        if run.confirmed >= run.messages:
            run.published()


class Run:
    """
    One run: the server listening, then the consumer and the producer
    (the producer once the consumer is subscribed, or, for a catch-up, the
    consumer once every publish is confirmed); the reactor stops once
    every message is acknowledged and the store is closed.
    """

    def __init__(
        self, reactor, messages, window, relay=False, store="memory", catch_up=False
    ):
        self.reactor = reactor
        self.messages = messages
        self.window = window
        self.catch_up = catch_up
        self.sent = self.confirmed = self.acked = 0
        self.scratch = None
        self.broker = self.store = None
        if relay:
            from caps.relay import RelayFactory

            factory = RelayFactory(fast=True)
        else:
            from caps.broker import Broker
            from caps.limits import Limits
            from caps.protocol import BrokerFactory
            from caps.store import open_store

            sync = STORES[store]
            description = "memory"
            if sync is not None:
                self.scratch = tempfile.mkdtemp(prefix="caps-loopback-")
                description = "sqlite:" + os.path.join(self.scratch, "caps.sqlite3")
            self.store = open_store(description, reactor, sync=sync or "full")
            self.broker = Broker(reactor, store=self.store, log_events=False)
            factory = BrokerFactory(self.broker, idle_timeout=0, limits=Limits(rate=0))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = self.port.getHost()
        self._started = set()

    def connect(self, make):
        if make not in self._started:
            self._started.add(make)
            protocol.ClientCreator(self.reactor, make, self).connectTCP(
                self.address.host, self.address.port
            )

    def start(self):
        self.connect(_Producer if self.catch_up else _Consumer)

    def subscribed(self):
        self.connect(_Producer)

    def published(self):
        self.connect(_Consumer)

    def acknowledged(self, count):
        self.acked += count
        if self.acked >= self.messages:
            self.reactor.callLater(0, self.finish)

    def finish(self):
        if self.broker is None:
            self.reactor.stop()
            return
        self.broker.stop()
        self.store.close().addBoth(self._closed)

    def _closed(self, _):
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.reactor.stop()


def main(reactor, argv):
    options = Options()
    options.parseOptions(argv)
    run = Run(
        reactor,
        options["messages"],
        options["window"],
        options["relay"],
        options["store"],
        options["catch-up"],
    )
    reactor.callWhenRunning(run.start)
    started = time.process_time()
    reactor.run()
    cpu = time.process_time() - started
    print(
        f"{run.acked:,} messages acknowledged, {cpu:.2f} s of CPU, "
        f"{cpu / run.messages * 1e6:.1f} µs per message (broker, producer and "
        "consumer together)"
    )
    return run


if __name__ == "__main__":
    from twisted.internet import reactor

    main(reactor, sys.argv[1:])
