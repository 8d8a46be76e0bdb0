"""
The floor for the benchmark: a bare Twisted relay of CAPS frames that
decodes every frame and encodes every delivery, and keeps nothing (no
queues, no acknowledgements, no store, no log).  A one-process Python
broker of our shape cannot use less CPU per message than this.

    python -m caps.relay        # prints "CAPS broker listening on HOST:PORT"
"""

import json
import sys

from twisted.internet import defer, protocol, task
from twisted.protocols.basic import LineReceiver


class Relay(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def lineReceived(self, line):
        frame = json.loads(line)
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
                    consumer.transport.write(_encode(delivery))
            payload = {"messageId": message_id, "queues": 1}
        if request_id is not None:
            self._answer("ok", payload, request_id)

    def _answer(self, event, payload, request_id):
        reply = {"event": event, "payload": payload, "id": request_id}
        self.transport.write(_encode(reply))


def _encode(frame):
    return json.dumps(frame, separators=(",", ":")).encode() + b"\n"


class RelayFactory(protocol.Factory):
    protocol = Relay

    def __init__(self):
        self.consumers = {}
        self.seq = 0


def main(reactor):
    port = reactor.listenTCP(0, RelayFactory(), interface="127.0.0.1")
    address = port.getHost()
    print(f"CAPS broker listening on {address.host}:{address.port}", flush=True)
    return defer.Deferred()


if __name__ == "__main__":
    task.react(lambda reactor: main(reactor), sys.argv[1:])
