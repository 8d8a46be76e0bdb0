"""
The client's side of the wire: one connection's lines in and out, and the
values the client hands to applications.
"""

import attrs
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from caps.frames import BadJSON, decode_json, encode_json


class CapsError(Exception):
    """
    The broker answered C{error}.
    """

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class Delivery:
    """
    A message the broker sent from one of our queues.
    """

    client_id: str
    event: str
    message_id: str
    payload: dict
    redelivered: bool = False
    deliveries: int = 1


@implementer(IHandshakeListener)
class ClientProtocol(LineReceiver):
    """
    One connection to the broker; everything it reads goes to the client.
    Over TLS, the connection counts as made once the handshake (and the
    check of the broker's certificate) succeeded.
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024
    log = Logger()

    def connectionMade(self):
        if not ISSLTransport.providedBy(self.transport):
            self.factory.client._connected(self)

    def handshakeCompleted(self):
        self.factory.client._connected(self)

    def connectionLost(self, reason):
        self.connected = 0
        self.factory.client._disconnected(self, reason)

    def lineReceived(self, line):
        try:
            frame = decode_json(line)
        except BadJSON as e:
            self.log.warn("broker sent a line that is not JSON: {why}", why=e)
            return
        if isinstance(frame, dict):
            self.factory.client._frame_received(frame)

    def send(self, frame):
        self.transport.write(encode_json(frame) + b"\n")


class ClientFactory(Factory):
    protocol = ClientProtocol
    noisy = False

    def __init__(self, client):
        self.client = client
