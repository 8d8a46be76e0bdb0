"""
The broker's side of a connection: bytes to frames to broker calls, and the
broker's answers and deliveries back to bytes.
"""

from collections import deque
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from caps import frames
from caps.fastframes import parse_line
from caps.gate import Gate, PayloadTooLarge
from caps.limits import Admission, Limits
from caps.replies import Replies, internal_error
from caps.sessions import IConnection

DEFAULT_MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 120.0
# Seconds a closing connection has to take what is left before it is cut.
CLOSE_GRACE = 10.0
# Changes waiting for the store past which a connection's frames are not
# read until the store has caught up.
BACKLOG_HIGH = 20_000

_TRUE_REDELIVERED = b',"redelivered":true,"deliveries":'
_FALSE_REDELIVERED = b',"redelivered":false,"deliveries":'


class _Valve:
    """
    The push producer a connection registers with its transport: when the
    transport's send buffer fills up, the broker stops sending it messages
    until the buffer drains.  (A separate object: L{LineReceiver} has
    methods of these names for another purpose.)
    """

    def __init__(self, protocol):
        self.protocol = protocol

    def pauseProducing(self):
        self.protocol.send_paused = True
        self.protocol.broker.pause(self.protocol)

    def resumeProducing(self):
        protocol = self.protocol
        protocol.send_paused = False
        protocol.unread = 0
        protocol.factory.holding_writes(protocol.broker.resume, protocol)

    def stopProducing(self):
        pass


@implementer(IConnection, IHandshakeListener)
class BrokerProtocol(LineReceiver, TimeoutMixin, Gate, Replies):
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
        # The IP address, for the per-address limits; None for UNIX sockets
        self.address = getattr(self.peer, "host", None)
        # The peer as observers see it: host:port, or a socket's path
        self.remote = (
            f"{self.address}:{self.peer.port}" if self.address else str(self.peer)
        )
        self.callLater = self.broker.clock.callLater
        self._abort = None
        # What was written while the factory holds writes (see _write)
        self._held = None
        refusal = self.factory.admission.admit(self.address)
        self.admitted = refusal is None
        if not self.admitted:
            self.log.info("{peer} refused: {why}", peer=self.peer, why=refusal)
            self._close_with(frames.error("too-many-connections", refusal))
            return
        self._open_gate()
        # The pieces of the line not finished yet, and their length
        self._unfinished = []
        self._unfinished_length = 0
        # Replies not written yet, in request order: [line, ready, id]
        self._replies = deque()
        # The store's batch the last held reply waits for, and the replies
        # waiting for it
        self._durable_batch = None
        self._durable_slots = None
        # The transport's send buffer is full; replies written meanwhile
        self.send_paused = False
        self.unread = 0
        self.broker.connect(self)
        self.transport.registerProducer(_Valve(self), True)
        self.setTimeout(self.factory.idle_timeout or None)
        self.log.info("{peer} connected", peer=self.peer)

    def connectionLost(self, reason):
        self.setTimeout(None)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if not self.admitted:
            return
        self.factory.admission.leave(self.address)
        self._close_gate()
        self.broker.disconnect(self)
        self.log.info("{peer} disconnected", peer=self.peer)

    def _close_with(self, line):
        """
        Write C{line} at once (ahead of any reply still waiting for the
        store) and close; cut the connection off if the client does not
        take it within a few seconds.
        """
        if self.transport.disconnecting:
            return
        self._write_held()
        self.transport.write(line)
        self.transport.loseConnection()
        self._abort = self.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def _write(self, data):
        """
        Write C{data} now, or, while the factory holds writes (handling
        what one read brought), at the end of that, joined with whatever
        else this connection was sent meanwhile: one transport write for
        a read's worth of replies and deliveries instead of one each.
        """
        held = self._held
        if held is not None:
            held.append(data)
            return
        holders = self.factory.holders
        if holders is None:
            self.transport.write(data)
        else:
            self._held = [data]
            holders.append(self)

    def _write_held(self):
        """
        Write what was held, if anything (before closing, and at the end
        of the factory's hold).
        """
        held = self._held
        if held is not None:
            self._held = None
            self.transport.write(b"".join(held))

    def dataReceived(self, data):
        self.factory.holding_writes(self._data_received, data)

    def _data_received(self, data):
        """
        Split what arrived into lines in one pass (L{LineReceiver}'s own
        C{dataReceived} searches the rest of the buffer again after every
        line) and handle them in order; this protocol never uses raw mode.
        The pieces of an unfinished line are kept apart and joined once
        its end arrives, so a line sent a byte at a time costs time in
        proportion to its length, not to its square.
        """
        if self.transport.disconnecting:
            return
        self.resetTimeout()
        if self._rate_resume is not None:
            # Over the rate: kept until the rate allows more.
            self._unfinished.append(data)
            return
        if b"\n" not in data:
            self._unfinished.append(data)
            self._unfinished_length += len(data)
            if self._unfinished_length > self.MAX_LENGTH:
                self.lineLengthExceeded(b"".join(self._unfinished))
            elif self._line_timeout and data:
                self._watch_partial(self.broker.clock.seconds(), False)
            return
        self._lines(self._take_unfinished(data))

    def _take_unfinished(self, data=b""):
        """
        The bytes kept back, with C{data} after them; nothing is kept back
        any more.
        """
        if self._unfinished:
            self._unfinished.append(data)
            data = b"".join(self._unfinished)
            self._unfinished = []
            self._unfinished_length = 0
        return data

    def _lines(self, data):
        """
        Handle the lines in C{data}, which holds at least one line end;
        keep what follows the last.
        """
        lines = data.split(b"\n")
        rest = lines.pop()
        limit = self.MAX_LENGTH
        transport = self.transport
        now = self.broker.clock.seconds()
        rate = self._rate
        if rate:
            self._refill(now)
        for index, line in enumerate(lines):
            if transport.disconnecting:
                return
            if len(line) > limit:
                self.lineLengthExceeded(line)
                return
            if rate:
                if self._tokens < 1:
                    self._rate_limited(line, b"\n".join([*lines[index + 1 :], rest]))
                    return
                self._tokens -= 1
            self.lineReceived(line)
        if transport.disconnecting:
            return
        if len(rest) > limit:
            self.lineLengthExceeded(rest)
        elif rest:
            self._unfinished = [rest]
            self._unfinished_length = len(rest)
            if self._line_timeout:
                self._watch_partial(now, True)
        else:
            self._partial_since = None

    def timeoutConnection(self):
        """
        Nothing came from the client, not even a ping, for the idle
        timeout: it is gone or stuck.  Tell it, close the connection (its
        messages go back to their queues), and cut it off if it does not
        take the goodbye within a few seconds.
        """
        self.log.info(
            "{peer} sent nothing for {seconds} s; closing",
            peer=self.peer,
            seconds=self.factory.idle_timeout,
        )
        self._close_with(
            frames.error(
                "idle-timeout",
                f"nothing received for {self.factory.idle_timeout:g} s; closing",
            )
        )

    def lineReceived(self, line):
        if self.transport.disconnecting:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            self.lineLengthExceeded(line)
            return
        if not line or line.isspace():
            # Blank lines are ignored: people type them in telnet.
            return
        request_id = None
        try:
            request_id, command = parse_line(line)
            if self.guard is not None:
                self.guard(command)
            handler, always, durable = _HANDLERS[type(command)]
            answer, payload = handler(self, command)
            if not (always or request_id is not None):
                return
            # (Deferred is an abstract base class's subclass: isinstance on
            # it is slow, and most payloads are plain dicts.)
            if type(payload) is not dict and isinstance(payload, defer.Deferred):
                reply = payload.addCallback(
                    lambda result: frames.reply(answer, result, request_id)
                )
            else:
                reply = frames.reply(answer, payload, request_id)
                if durable and self._wait_durable(reply, request_id):
                    reply = None
        except frames.ProtocolError as e:
            if e.request_id is None:
                e.request_id = request_id
            self._reply(self._refused(e))
        except Exception:
            self.log.failure(
                "internal error handling a frame from {peer}", peer=self.peer
            )
            self._reply(internal_error(request_id))
        else:
            if reply is not None:
                self._reply(reply, request_id)
        if self.broker.store.backlog > BACKLOG_HIGH:
            self._throttle()

    def _throttle(self):
        """
        The store is falling behind: read nothing more from this client
        until it has caught up with everything so far.
        """
        caught_up = self.broker.store.flushed()
        if "store" in self._holds or caught_up is None:
            return
        self._hold("store")
        caught_up.addBoth(lambda _: self._release("store"))

    def lineLengthExceeded(self, line):
        self.log.info(
            "{peer} sent a line over {limit} bytes; closing",
            peer=self.peer,
            limit=self.max_line,
        )
        # Written at once, ahead of any reply still waiting for the store:
        # the connection closes.
        self._close_with(
            frames.error(
                "line-too-long", f"a line may be at most {self.max_line} bytes"
            )
        )

    # Each handler returns the reply's event and payload (or a Deferred of
    # the payload).

    def _subscribe(self, c):
        return "ok", self.broker.subscribe(
            self,
            c.client_id,
            c.event,
            c.filter,
            prefetch=c.prefetch,
            ack_timeout=c.ack_timeout,
            max_length=c.max_length,
        )

    def _unsubscribe(self, c):
        return "ok", self.broker.unsubscribe(self, c.client_id, c.event, c.delete)

    def _get_all(self, c):
        return "ok", self.broker.get_all(self, c.client_id, c.event)

    def _received(self, c):
        return "ok", self.broker.received(c.client_id, c.event, c.message_id)

    def _nack(self, c):
        return "ok", self.broker.nack(self, c.client_id, c.event, c.message_id, c.delay)

    def _requeue(self, c):
        return "ok", self.broker.requeue(c.client_id, c.event, c.message_id)

    def _ping(self, c):
        return "pong", c.payload

    def _publish(self, c):
        if len(c.body) > self.max_payload:
            raise PayloadTooLarge(
                f"the payload is {len(c.body)} bytes as compact JSON; "
                f"the limit is {self.max_payload}"
            )
        identity = self.identity
        return "ok", self.broker.publish(
            c.event,
            c.payload,
            c.body,
            c.to,
            c.message_id,
            c.ttl,
            identity.client_id if identity is not None else None,
        )

    def deliver(self, entry):
        queue = entry.queue
        message = entry.message
        parts = [
            b'{"event":',
            queue.event_json,
            b',"clientId":',
            queue.client_json,
            b',"messageId":',
            frames.encode_json(message.id),
            b',"payload":',
            message.payload,
            _TRUE_REDELIVERED if entry.deliveries > 1 else _FALSE_REDELIVERED,
            str(entry.deliveries).encode("ascii"),
        ]
        if entry.dead is not None:
            reason, died = entry.dead
            parts.append(b',"deadLetter":')
            parts.append(frames.encode_json({"reason": reason, "time": _iso(died)}))
        parts.append(b"}\n")
        self._write(b"".join(parts))


# command type -> (handler, whether to answer a frame without id, whether
# the answer waits until the change is durable)
_HANDLERS = {
    frames.Subscribe: (BrokerProtocol._subscribe, False, True),
    frames.Unsubscribe: (BrokerProtocol._unsubscribe, False, True),
    frames.GetAll: (BrokerProtocol._get_all, True, False),
    frames.Received: (BrokerProtocol._received, False, True),
    frames.Nack: (BrokerProtocol._nack, False, True),
    frames.Requeue: (BrokerProtocol._requeue, False, True),
    frames.Ping: (BrokerProtocol._ping, True, False),
    frames.Publish: (BrokerProtocol._publish, False, True),
    frames.Login: (BrokerProtocol._login, True, False),
}


def _iso(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


class BrokerFactory(Factory):
    """
    Builds a L{BrokerProtocol} for each connection to one broker.

    @ivar idle_timeout: seconds without a byte from a client before its
        connection is closed; L{None} or 0 for never.
    @ivar portal: a twisted.cred L{Portal} giving L{caps.auth.IClient}s: a
        client must log in first; L{None} for an open broker.
    @ivar limits: the L{Limits} on each client.
    """

    protocol = BrokerProtocol
    noisy = False

    def __init__(
        self,
        broker,
        max_line=DEFAULT_MAX_LINE,
        idle_timeout=IDLE_TIMEOUT,
        portal=None,
        limits=None,
    ):
        self.broker = broker
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.portal = portal
        self.limits = limits or Limits()
        self.admission = Admission(self.limits)
        # While not None: the connections whose writes are held
        self.holders = None

    def holding_writes(self, f, *args):
        """
        Call C{f(*args)}, holding every connection's writes until it
        returns (see L{BrokerProtocol._write}); within a hold already, just
        call it.
        """
        if self.holders is not None:
            return f(*args)
        self.holders = holders = []
        try:
            return f(*args)
        finally:
            self.holders = None
            for protocol in holders:
                protocol._write_held()
