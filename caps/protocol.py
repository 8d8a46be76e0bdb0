"""
The broker's side of a connection: bytes to frames to broker calls, and the
broker's answers and deliveries back to bytes.
"""

from collections import deque

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from caps import frames
from caps.broker import IConnection
from caps.store import StoreUnavailable

DEFAULT_MAX_LINE = 64 * 1024

_TRUE_REDELIVERED = b',"redelivered":true,"deliveries":'
_FALSE_REDELIVERED = b',"redelivered":false,"deliveries":'


@implementer(IConnection)
class BrokerProtocol(LineReceiver):
    """
    One client connection: newline-delimited JSON frames in, replies and
    deliveries out.
    """

    delimiter = b"\n"
    log = Logger()

    def connectionMade(self):
        self.broker = self.factory.broker
        self.max_line = self.factory.max_line
        # One more byte for the optional "\r" before the "\n".
        self.MAX_LENGTH = self.max_line + 1
        self.peer = self.transport.getPeer()
        # command type -> (handler, whether to answer a frame without id,
        # whether the answer waits until the change is durable)
        self._handlers = {
            frames.Subscribe: (self._subscribe, False, True),
            frames.Unsubscribe: (self._unsubscribe, False, True),
            frames.GetAll: (self._get_all, True, False),
            frames.Received: (self._received, False, True),
            frames.Ping: (self._ping, True, False),
            frames.Publish: (self._publish, False, True),
        }
        # Replies not written yet, in request order: [line, ready]
        self._replies = deque()
        self.broker.connect(self)
        self.log.info("{peer} connected", peer=self.peer)

    def connectionLost(self, reason):
        self.broker.disconnect(self)
        self.log.info("{peer} disconnected", peer=self.peer)

    def lineReceived(self, line):
        if self.transport.disconnecting:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            self.lineLengthExceeded(line)
            return
        if not line.strip():
            # Blank lines are ignored: people type them in telnet.
            return
        request_id = None
        try:
            request_id, command = frames.parse_line(line)
            handler, always, durable = self._handlers[type(command)]
            answer, payload = handler(command)
            if not (always or request_id is not None):
                return
            reply = frames.reply(answer, payload, request_id)
        except frames.ProtocolError as e:
            if e.request_id is None:
                e.request_id = request_id
            self._reply(self._refused(e))
        except Exception:
            self.log.failure(
                "internal error handling a frame from {peer}", peer=self.peer
            )
            self._reply(_internal_error(request_id))
        else:
            wait = self.broker.store.flushed() if durable else None
            self._reply(reply, wait, request_id)

    def _refused(self, e):
        self.log.info(
            "{peer} refused: {code}: {message}",
            peer=self.peer,
            code=e.code,
            message=e.message,
        )
        return frames.error(e.code, e.message, e.request_id)

    def _reply(self, line, durable=None, request_id=None):
        """
        Write a reply after every reply to earlier frames; with C{durable}
        (a L{Deferred} from the store), once it fires: an C{ok} goes out
        only when what it confirms is on disk.
        """
        if durable is None and not self._replies:
            self.transport.write(line)
            return
        slot = [line, durable is None]
        self._replies.append(slot)
        if durable is None:
            return

        def done(result):
            if isinstance(result, Failure):
                if result.check(StoreUnavailable):
                    result.value.request_id = request_id
                    slot[0] = self._refused(result.value)
                else:
                    self.log.failure("store failed", result)
                    slot[0] = _internal_error(request_id)
            slot[1] = True
            while self._replies and self._replies[0][1]:
                self.transport.write(self._replies.popleft()[0])

        durable.addBoth(done)

    def lineLengthExceeded(self, line):
        self.log.info(
            "{peer} sent a line over {limit} bytes; closing",
            peer=self.peer,
            limit=self.max_line,
        )
        # Written at once, ahead of any reply still waiting for the store:
        # the connection closes.
        self.transport.write(
            frames.error(
                "line-too-long", f"a line may be at most {self.max_line} bytes"
            )
        )
        self.transport.loseConnection()

    # Each handler returns the reply's event and payload.

    def _subscribe(self, c):
        return "ok", self.broker.subscribe(self, c.client_id, c.event, c.filter)

    def _unsubscribe(self, c):
        return "ok", self.broker.unsubscribe(self, c.client_id, c.event, c.delete)

    def _get_all(self, c):
        return "ok", self.broker.get_all(self, c.client_id, c.event)

    def _received(self, c):
        return "ok", self.broker.received(c.client_id, c.event, c.message_id)

    def _ping(self, c):
        return "pong", c.payload

    def _publish(self, c):
        return "ok", self.broker.publish(c.event, c.payload, c.body, c.to, c.message_id)

    def deliver(self, entry):
        queue = entry.queue
        message = entry.message
        self.transport.write(
            b"".join(
                (
                    b'{"event":',
                    queue.event_json,
                    b',"clientId":',
                    queue.client_json,
                    b',"messageId":',
                    message.id_json,
                    b',"payload":',
                    message.payload,
                    _TRUE_REDELIVERED if entry.deliveries > 1 else _FALSE_REDELIVERED,
                    str(entry.deliveries).encode("ascii"),
                    b"}\n",
                )
            )
        )


def _internal_error(request_id):
    return frames.error("internal-error", "the broker failed; see its log", request_id)


class BrokerFactory(Factory):
    """
    Builds a L{BrokerProtocol} for each connection to one broker.
    """

    protocol = BrokerProtocol
    noisy = False

    def __init__(self, broker, max_line=DEFAULT_MAX_LINE):
        self.broker = broker
        self.max_line = max_line
