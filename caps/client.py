"""
The client side of the CAPS protocol, shared by the vendor and driver apps.

L{CapsClient} keeps one connection to the broker up with
L{twisted.application.internet.ClientService} (reconnecting with exponential
back-off).  On every (re)connect it subscribes to each of its queues again
and catches up (the backlog arrives first, as much as the window takes;
the answer to the subscribe marks its end), and re-sends every publish the
broker has not confirmed, with the same messageId so the broker drops
repeats.  A message
is acknowledged only after its handler finished, and a message handled
once is never handed to the handler again.

L{RotatingEndpoint} spreads the connection over several brokers (that share
one store): each new connection goes to the next broker once the last one
failed or was lost.
"""

import itertools
import uuid
from collections import OrderedDict

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, task
from twisted.logger import Logger

from caps.client_protocol import CapsError, ClientFactory, Delivery
from caps.frames import encode_json

HANDLED_MEMORY = 100_000
MAX_LINE = 64 * 1024
PING_INTERVAL = 30.0
# Errors that say a frame can never succeed; any other error (the store is
# failing, the broker hit a bug, a limit) is worth trying again.
FINAL_ERRORS = frozenset(
    {
        "bad-json",
        "bad-frame",
        "bad-name",
        "reserved-event",
        "line-too-long",
        "forbidden",
        "payload-too-large",
    }
)
# Seconds before trying a refused publish or a failed handler again,
# doubling each time up to the maximum.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


def _retry_delay(attempts):
    return min(RETRY_FIRST * 2 ** max(attempts - 1, 0), RETRY_MAX)


@attrs.define(eq=False)
class Subscription:
    """
    @ivar closing: unsubscribe was asked for; it is sent once the handlers
        still running for this queue are done.
    """

    client_id: str
    event: str
    handler: object
    filter: dict | None = None
    on_caught_up: object = None
    prefetch: int | None = None
    ack_timeout: float | None = None
    closing: bool = False


@attrs.define(eq=False)
class _Outgoing:
    """
    A publish the broker has not confirmed yet.

    @ivar sent: it was sent on the current connection and awaits an answer.
    @ivar attempts: how many times the broker refused it for now.
    """

    frame: dict
    deferred: defer.Deferred
    sent: bool = False
    attempts: int = 0
    retry: object = None


class _Recent:
    """
    A bounded set that forgets its oldest members.
    """

    def __init__(self, size):
        self._items = OrderedDict()
        self._size = size

    def add(self, item):
        self._items[item] = None
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, item):
        return item in self._items


class CapsClient:
    """
    A reconnecting connection to a CAPS broker.

    @param endpoint: an C{IStreamClientEndpoint} for the broker; a
        L{RotatingEndpoint} for several, tried in turn.
    @param clock: an C{IReactorTime} for back-off and stop time-outs.
    """

    log = Logger()

    def __init__(
        self,
        endpoint,
        clock,
        retry_policy=None,
        ping_interval=PING_INTERVAL,
        max_line=MAX_LINE,
        credentials=None,
    ):
        self.clock = clock
        # (clientId, password) to log in with on each connection, or None
        self.credentials = credentials
        # The broker's --max-line: longer publishes fail at once.
        self.max_line = max_line
        # Ping the broker this often; no answer by the next ping means the
        # connection is dead (half-open): drop it and reconnect.
        self._pinging = task.LoopingCall(self._ping)
        self._pinging.clock = clock
        self._ping_interval = ping_interval
        self._awaiting_pong = False
        self._service = ClientService(
            endpoint,
            ClientFactory(self),
            retryPolicy=retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=5.0),
            clock=clock,
        )
        self._protocol = None
        self._ids = itertools.count(1)
        self._subscriptions = {}
        # messageId -> _Outgoing, for publishes not yet confirmed
        self._outbox = OrderedDict()
        # request id -> what to do with the answer, for this connection
        self._requests = {}
        self._handled = _Recent(HANDLED_MEMORY)
        # (clientId, event, messageId) -> running handler
        self._working = {}
        # Timers that try something refused for now again
        self._timers = set()
        # (clientId, event, messageId) of acknowledgements not yet confirmed
        self._acking = set()
        self._idle_waiters = []
        # (clientId, event) -> deliveries counted during its catch-up
        self._catching_up = {}
        # None until stop(); then the callers waiting for it; True once closed
        self._stopped = None
        self._stopping = False
        self.on_connect = None
        self.on_disconnect = None

    # Life cycle

    def start(self):
        self._service.startService()

    def stop(self, timeout=5.0):
        """
        Stop taking new messages, then close once every publish and
        acknowledgement is confirmed and every running handler has finished,
        or after C{timeout} seconds.  Safe to call more than once.

        @return: a L{Deferred} that fires once the connection is closed.
        """
        if self._stopped is None:
            self._stopped = []
            # No new work from here on: messages not handled yet go back to
            # their queues when the connection closes.
            self._stopping = True
            waiter = defer.Deferred()
            self._idle_waiters.append(waiter)
            waiter.addTimeout(timeout, self.clock, onTimeoutCancel=lambda *a: None)
            waiter.addCallback(lambda _: self._service.stopService())
            waiter.addBoth(self._closed)
            self._check_idle()
        closed = defer.Deferred()
        if self._stopped is True:
            closed.callback(None)
        else:
            self._stopped.append(closed)
        return closed

    def _closed(self, result):
        for call in self._timers:
            call.cancel()
        self._timers.clear()
        watchers, self._stopped = self._stopped, True
        for watcher in watchers:
            watcher.callback(None)
        return result

    @property
    def connected(self):
        return self._protocol is not None

    @property
    def stopping(self):
        """
        Whether L{stop} was called.
        """
        return self._stopping

    def _is_idle(self):
        return not (self._outbox or self._working or self._acking)

    def _check_idle(self):
        if self._is_idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:  # else it timed out already
                    waiter.callback(None)

    # Public operations

    def subscribe(
        self,
        client_id,
        event,
        handler,
        filter=None,
        on_caught_up=None,
        prefetch=None,
        ack_timeout=None,
    ):
        """
        Consume (clientId, event): C{handler(delivery)} is called for each
        message once (it may return a L{Deferred}); the message is
        acknowledged when it returns.  After each (re)connect the queue's
        backlog is sent first; C{on_caught_up(count)} is then called with
        how many messages it held, before live messages follow.

        @param prefetch: the most messages the broker sends before the
            first is acknowledged (its own default if L{None}).
        @param ack_timeout: seconds the broker waits for an acknowledgement
            before sending the message again (its own default if L{None}).
        """
        subscription = Subscription(
            client_id, event, handler, filter, on_caught_up, prefetch, ack_timeout
        )
        self._subscriptions[client_id, event] = subscription
        if self._protocol is not None:
            self._catch_up(subscription)

    def unsubscribe(self, client_id, event):
        """
        Stop consuming (clientId, event): no new message goes to the
        handler; once the ones it is handling are done and acknowledged, the
        broker is told, and takes back the rest.  The queue itself stays and
        keeps collecting messages.
        """
        self._subscriptions[client_id, event].closing = True
        self._close_subscriptions()

    def _close_subscriptions(self):
        busy = {key[:2] for key in self._working}
        for key, subscription in list(self._subscriptions.items()):
            if subscription.closing and key not in busy:
                del self._subscriptions[key]
                self._send_unsubscribe(key)

    def _send_unsubscribe(self, key):
        if self._protocol is None:
            return

        def refused(error):
            if error.code not in FINAL_ERRORS:
                self._later(_retry_delay(1), lambda: self._send_unsubscribe(key))

        queue = {"clientId": key[0], "event": key[1]}
        self._request({"event": "unsubscribe", "payload": queue}, None, refused)

    def publish(self, event, payload, to=None, message_id=None):
        """
        Publish a message; kept and re-sent after reconnects until the broker
        confirms it.

        @return: a L{Deferred} firing with the broker's C{ok} payload, or
            failing with L{CapsError} if the broker refuses the message.
        """
        if message_id is None:
            message_id = uuid.uuid4().hex
        frame = {"event": event, "payload": payload, "messageId": message_id}
        if to is not None:
            frame["to"] = to
        size = len(encode_json(frame))
        if size > self.max_line:
            # The broker would close the connection on it, again and again.
            return defer.fail(
                CapsError(
                    "line-too-long",
                    f"the frame is {size} bytes; the broker takes {self.max_line}",
                )
            )
        if message_id in self._outbox:
            return self._outbox[message_id].deferred
        d = defer.Deferred()
        self._outbox[message_id] = _Outgoing(frame, d)
        if self._protocol is not None:
            self._send_publish(message_id)
        return d

    # Connection events

    def _connected(self, protocol):
        """
        A connection is up: log in first if the client has credentials
        (nothing else is sent before the broker accepts them).
        """
        if self.credentials is None:
            self._logged_in(protocol)
            return
        client_id, password = self.credentials
        request_id = next(self._ids)

        def refused(error):
            self.log.error(
                "the broker refused the login as {clientId}: {error}; "
                "trying again after reconnecting",
                clientId=client_id,
                error=error,
            )
            protocol.transport.loseConnection()

        self._requests[request_id] = (lambda _: self._logged_in(protocol), refused)
        protocol.send(
            {
                "event": "login",
                "id": request_id,
                "payload": {"clientId": client_id, "password": password},
            }
        )

    def _logged_in(self, protocol):
        if not protocol.connected:
            return
        self._protocol = protocol
        self.log.info("connected to the broker")
        # Acknowledgements first, so that the broker does not send those
        # messages again with the backlog.
        for key in self._acking:
            self._send_ack(key)
        self._close_subscriptions()
        for subscription in self._subscriptions.values():
            self._catch_up(subscription)
        for message_id, outgoing in self._outbox.items():
            if outgoing.retry is None:
                self._send_publish(message_id)
        self._awaiting_pong = False
        if self._ping_interval:
            self._pinging.start(self._ping_interval, now=False)
        if self.on_connect is not None:
            self.on_connect()

    def _disconnected(self, protocol, reason=None):
        if reason is not None and reason.check(SSL.Error, VerificationError):
            self.log.warn(
                "TLS with the broker failed: {why}", why=reason.getErrorMessage()
            )
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._requests.clear()
        self._catching_up.clear()
        for outgoing in self._outbox.values():
            outgoing.sent = False
        if self._pinging.running:
            self._pinging.stop()
        if self.on_disconnect is not None:
            self.on_disconnect()

    def _ping(self):
        if self._awaiting_pong:
            self.log.warn(
                "no answer from the broker in {seconds} s; reconnecting",
                seconds=self._ping_interval,
            )
            self._protocol.transport.abortConnection()
            return
        self._awaiting_pong = True

        def pong(_):
            self._awaiting_pong = False

        self._request({"event": "ping"}, pong)

    def _later(self, delay, f):
        """
        Call C{f} after C{delay} seconds, unless the client has closed.
        """

        def fire():
            self._timers.discard(call)
            f()

        call = self.clock.callLater(delay, fire)
        self._timers.add(call)
        return call

    def _request(self, frame, on_ok, on_error=None):
        request_id = next(self._ids)
        frame["id"] = request_id
        self._requests[request_id] = (on_ok, on_error)
        self._protocol.send(frame)

    def _catch_up(self, subscription):
        """
        Subscribe: the broker sends the backlog, as much as the window
        (prefetch) takes, before its answer, which marks the end of the
        catch-up.  (Not C{getAll}: it would send the whole backlog past the
        window.)
        """
        key = (subscription.client_id, subscription.event)
        payload = {"clientId": subscription.client_id, "event": subscription.event}
        for name, value in (
            ("filter", subscription.filter),
            ("prefetch", subscription.prefetch),
            ("ackTimeout", subscription.ack_timeout),
        ):
            if value is not None:
                payload[name] = value

        def caught_up(_):
            count = self._catching_up.pop(key, 0)
            if subscription.on_caught_up is not None:
                subscription.on_caught_up(count)

        def refused(error):
            self._catching_up.pop(key, None)
            if error.code in FINAL_ERRORS:
                self.log.error(
                    "subscribe to {queue} refused: {error}", queue=key, error=error
                )
                return
            self.log.warn(
                "subscribe to {queue} refused ({error}); trying again",
                queue=key,
                error=error,
            )
            self._later(_retry_delay(1), again)

        def again():
            current = self._subscriptions.get(key)
            if self._protocol is not None and current is subscription:
                self._catch_up(subscription)

        self._catching_up[key] = 0
        self._request({"event": "subscribe", "payload": payload}, caught_up, refused)

    def _send_publish(self, message_id):
        outgoing = self._outbox[message_id]
        outgoing.sent = True

        def ok(payload):
            if self._outbox.pop(message_id, None) is outgoing:
                outgoing.deferred.callback(payload)
                self._check_idle()

        def refused(error):
            outgoing.sent = False
            if error.code in FINAL_ERRORS:
                del self._outbox[message_id]
                outgoing.deferred.errback(error)
                self._check_idle()
                return
            outgoing.attempts += 1
            delay = _retry_delay(outgoing.attempts)
            self.log.warn(
                "publish {messageId} refused ({error}); trying again in {delay} s",
                messageId=message_id,
                error=error,
                delay=delay,
            )
            outgoing.retry = self._later(delay, resend)

        def resend():
            outgoing.retry = None
            if self._protocol is not None and not outgoing.sent:
                self._send_publish(message_id)

        self._request(dict(outgoing.frame), ok, refused)

    # Frames from the broker

    def _frame_received(self, frame):
        event = frame.get("event")
        payload = frame.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        if event in ("ok", "error", "pong"):
            handlers = self._requests.pop(frame.get("id"), None)
            if event == "error":
                error = CapsError(payload.get("code"), payload.get("message"))
                if handlers is None or handlers[1] is None:
                    self.log.warn("the broker answered: {error}", error=error)
                else:
                    handlers[1](error)
            elif handlers is not None and handlers[0] is not None:
                handlers[0](payload)
        elif "messageId" in frame and "clientId" in frame:
            self._delivery(
                Delivery(
                    frame["clientId"],
                    event,
                    frame["messageId"],
                    payload,
                    bool(frame.get("redelivered")),
                    frame.get("deliveries", 1),
                )
            )

    def _delivery(self, delivery):
        key = (delivery.client_id, delivery.event, delivery.message_id)
        if key[:2] in self._catching_up:
            self._catching_up[key[:2]] += 1
        if key in self._handled:
            if key not in self._acking:
                self._ack(key)
            return
        if key in self._working:
            return
        subscription = self._subscriptions.get(key[:2])
        if self._stopping or subscription is None or subscription.closing:
            # Not ours to handle any more: it goes back to its queue when
            # the broker takes the unsubscribe, or the connection closes.
            return
        self._dispatch(subscription, delivery, key)

    def _dispatch(self, subscription, delivery, key):
        # Registered first: a handler that finishes at once must find it.
        self._working[key] = None
        d = defer.maybeDeferred(subscription.handler, delivery)
        self._working[key] = d

        def handled(_):
            del self._working[key]
            self._handled.add(key)
            self._ack(key)
            self._after_work()

        def failed(failure):
            del self._working[key]
            # The broker takes it back and sends it again after a back-off,
            # perhaps to another consumer; after too many deliveries it goes
            # to the dead letters.
            delay = _retry_delay(delivery.deliveries)
            self.log.failure(
                "handler failed for {queue} {messageId}; it comes back in {delay} s",
                failure,
                queue=key[:2],
                messageId=key[2],
                delay=delay,
            )
            if self._protocol is not None:
                queue = {"clientId": key[0], "event": key[1], "messageId": key[2]}
                self._request(
                    {"event": "nack", "payload": dict(queue, delay=delay)}, None
                )
            self._after_work()

        d.addCallbacks(handled, failed)

    def _after_work(self):
        self._close_subscriptions()
        self._check_idle()

    def _ack(self, key):
        """
        Acknowledge a handled message, now or, if the connection is down or
        goes down before the broker confirms, after the next reconnect.
        """
        self._acking.add(key)
        if self._protocol is not None:
            self._send_ack(key)

    def _send_ack(self, key):
        client_id, event, message_id = key

        def confirmed(_):
            self._acking.discard(key)
            self._check_idle()

        def refused(error):
            if error.code in FINAL_ERRORS:
                confirmed(None)
            else:
                self._later(_retry_delay(1), again)

        def again():
            if key in self._acking and self._protocol is not None:
                self._send_ack(key)

        self._request(
            {
                "event": "received",
                "payload": {
                    "clientId": client_id,
                    "event": event,
                    "messageId": message_id,
                },
            },
            confirmed,
            refused,
        )
