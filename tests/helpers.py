"""
Test helpers shared by several test modules.
"""

import json

from zope.interface import implementer

from caps.broker import IConnection


@implementer(IConnection)
class RecordingConnection:
    """
    A connection that records what the broker sent it.
    """

    def __init__(self, name="conn"):
        self.name = name
        self.deliveries = []

    def deliver(self, entry):
        self.deliveries.append(
            {
                "clientId": entry.queue.client_id,
                "event": entry.queue.event,
                "messageId": entry.message.id,
                "payload": json.loads(entry.message.payload),
                "redelivered": entry.deliveries > 1,
                "deliveries": entry.deliveries,
            }
        )

    def ids(self):
        return [d["messageId"] for d in self.deliveries]

    def take(self):
        """
        Return what was delivered since the last call.
        """
        taken, self.deliveries = self.deliveries, []
        return taken

    def __repr__(self):
        return f"<RecordingConnection {self.name}>"


class MemoryNetwork:
    """
    A broker and its clients in memory: a L{MemoryReactorClock} for time and
    connections, and iosim pumps to move the bytes.
    """

    PORT = 3000

    def __init__(self, portal=None):
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.testing import MemoryReactorClock
        from twisted.test.iosim import ConnectionCompleter

        from caps.broker import Broker
        from caps.protocol import BrokerFactory

        self.reactor = MemoryReactorClock()
        self.broker = Broker(self.reactor)
        TCP4ServerEndpoint(self.reactor, self.PORT).listen(
            BrokerFactory(self.broker, portal=portal)
        )
        self._completer = ConnectionCompleter(self.reactor)
        self.pumps = []

    def endpoint(self):
        from twisted.internet.endpoints import TCP4ClientEndpoint

        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.PORT)

    def client(self, credentials=None):
        """
        A started L{CapsClient}, connected.
        """
        from caps.client import CapsClient

        client = CapsClient(self.endpoint(), self.reactor, credentials=credentials)
        client.start()
        self.complete()
        return client

    def complete(self):
        """
        Let every pending connection attempt succeed.
        """
        while (pump := self._completer.succeedOnce()) is not None:
            self.pumps.append(pump)
        self.flush()

    def flush(self):
        for _ in range(100):
            moved = [pump.flush() for pump in self.pumps]
            if not any(moved):
                break
        self.pumps = [p for p in self.pumps if not p.clientIO.disconnected]

    def advance(self, seconds, step=0.05):
        """
        Let C{seconds} pass in small steps, moving bytes and completing
        connections as they come.
        """
        for _ in range(round(seconds / step)):
            self.reactor.advance(step)
            self.complete()

    def drop(self, pump, lose_pending=False):
        """
        Break one connection, optionally losing the bytes still in flight
        from the broker to the client.
        """
        if lose_pending:
            pump.serverIO.getOutBuffer()
        pump.serverIO.loseConnection()
        pump.flush()
        self.pumps.remove(pump)
