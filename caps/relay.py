"""
The floor for the benchmark: a bare Twisted relay of CAPS frames that
decodes every frame and encodes every delivery, and keeps nothing (no
queues, no acknowledgements, no store, no log).  A one-process Python
broker of our shape cannot use less CPU per message than this.

    python -m caps.relay          # stdlib json, LineReceiver
    python -m caps.relay --fast   # orjson, LineOnlyReceiver

Either prints "CAPS broker listening on HOST:PORT".  The first is the
floor for a broker written the obvious way; the second for one that picks
the fastest codec and line splitter (LineReceiver looks for a mode switch
after every line; LineOnlyReceiver splits the buffer once per read).
"""

import json
import sys

from twisted.internet import defer, protocol, task
from twisted.protocols.basic import LineOnlyReceiver, LineReceiver
from twisted.python import usage


def _encode(frame):
    return json.dumps(frame, separators=(",", ":")).encode() + b"\n"


class _Relaying:
    """
    What both relays do with a line: route a publish to the one consumer
    of its (clientId, event), answer with C{ok} or C{pong}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    loads = staticmethod(json.loads)
    encode = staticmethod(_encode)

    def lineReceived(self, line):
        frame = self.loads(line)
        event = frame["event"]
        payload = frame.get("payload") or {}
        request_id = frame.get("id")
        consumers = self.factory.consumers
        if event == "subscribe":
            consumers[payload["clientId"], payload["event"]] = self
        elif event == "ping":
            self._answer("pong", payload, request_id)
            return
        elif event != "received":
            self.factory.seq += 1
            message_id = str(self.factory.seq)
            to = frame.get("to") or ()
            for client_id in [to] if isinstance(to, str) else to:
                consumer = consumers.get((client_id, event))
                if consumer is not None:
                    delivery = {
                        "event": event,
                        "clientId": client_id,
                        "messageId": message_id,
                        "payload": payload,
                        "redelivered": False,
                        "deliveries": 1,
                    }
                    consumer.transport.write(self.encode(delivery))
            payload = {"messageId": message_id, "queues": 1}
        if request_id is not None:
            self._answer("ok", payload, request_id)

    def _answer(self, event, payload, request_id):
        reply = {"event": event, "payload": payload, "id": request_id}
        self.transport.write(self.encode(reply))


class Relay(_Relaying, LineReceiver):
    """
    The relay written the obvious way: the standard library's json and
    Twisted's general line receiver.
    """


class FastRelay(_Relaying, LineOnlyReceiver):
    """
    The relay with the fastest parts at hand: orjson and the line receiver
    without raw mode.
    """

    def __init__(self):
        import orjson

        self.loads = orjson.loads
        self.encode = lambda frame: orjson.dumps(frame) + b"\n"


class RelayFactory(protocol.Factory):
    protocol = Relay

    def __init__(self, fast=False):
        self.consumers = {}
        self.seq = 0
        if fast:
            self.protocol = FastRelay


class Options(usage.Options):
    optFlags = [
        ["fast", None, "orjson and LineOnlyReceiver instead of json and LineReceiver."]
    ]


def main(reactor, *argv):
    options = Options()
    options.parseOptions(argv)
    factory = RelayFactory(fast=options["fast"])
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = port.getHost()
    print(f"CAPS broker listening on {address.host}:{address.port}", flush=True)
    return defer.Deferred()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
