"""
The client side of the CAPS protocol, shared by the vendor and driver apps.

L{CapsClient} keeps one connection to the broker up with
L{twisted.application.internet.ClientService} (reconnecting with exponential
back-off).  On every (re)connect it subscribes to each of its queues again
and catches up (the backlog arrives first; the answer to a C{getAll} marks
its end), and re-sends every publish the broker has not confirmed, with the
same messageId so the broker drops repeats.  A message
is acknowledged only after its handler finished, and a message handled
once is never handed to the handler again.
"""

import itertools
import uuid
from collections import OrderedDict

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from caps.frames import BadJSON, decode_json, encode_json

HANDLED_MEMORY = 100_000


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


@attrs.define(eq=False)
class Subscription:
    client_id: str
    event: str
    handler: object
    filter: dict | None = None
    on_caught_up: object = None


class ClientProtocol(LineReceiver):
    """
    One connection to the broker; everything it reads goes to the client.
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024
    log = Logger()

    def connectionMade(self):
        self.factory.client._connected(self)

    def connectionLost(self, reason):
        self.factory.client._disconnected(self)

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


class _ClientFactory(Factory):
    protocol = ClientProtocol
    noisy = False

    def __init__(self, client):
        self.client = client


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

    @param endpoint: an C{IStreamClientEndpoint} for the broker.
    @param clock: an C{IReactorTime} for back-off and stop time-outs.
    """

    log = Logger()

    def __init__(self, endpoint, clock, retry_policy=None):
        self.clock = clock
        self._service = ClientService(
            endpoint,
            _ClientFactory(self),
            retryPolicy=retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=5.0),
            clock=clock,
        )
        self._protocol = None
        self._ids = itertools.count(1)
        self._subscriptions = {}
        # messageId -> (frame, Deferred) for publishes not yet confirmed
        self._outbox = OrderedDict()
        # request id -> what to do with the answer, for this connection
        self._requests = {}
        self._handled = _Recent(HANDLED_MEMORY)
        # (clientId, event, messageId) -> running handler
        self._working = {}
        # (clientId, event, messageId) of acknowledgements not yet confirmed
        self._acking = set()
        self._idle_waiters = []
        # (clientId, event) -> deliveries counted during its catch-up
        self._catching_up = {}
        # None until stop(); then the callers waiting for it; True once closed
        self._stopped = None
        self.on_connect = None
        self.on_disconnect = None

    # Life cycle

    def start(self):
        self._service.startService()

    def stop(self, timeout=5.0):
        """
        Stop after every publish and acknowledgement is confirmed and every
        running handler has finished, or after C{timeout} seconds.  Safe to
        call more than once.

        @return: a L{Deferred} that fires once the connection is closed.
        """
        if self._stopped is None:
            self._stopped = []
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
        watchers, self._stopped = self._stopped, True
        for watcher in watchers:
            watcher.callback(None)
        return result

    @property
    def connected(self):
        return self._protocol is not None

    def _is_idle(self):
        return not (self._outbox or self._working or self._acking)

    def _check_idle(self):
        if self._is_idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:  # else it timed out already
                    waiter.callback(None)

    # Public operations

    def subscribe(self, client_id, event, handler, filter=None, on_caught_up=None):
        """
        Consume (clientId, event): C{handler(delivery)} is called for each
        message once (it may return a L{Deferred}); the message is
        acknowledged when it returns.  After each (re)connect the queue's
        backlog is sent first; C{on_caught_up(count)} is then called with
        how many messages it held, before live messages follow.
        """
        subscription = Subscription(client_id, event, handler, filter, on_caught_up)
        self._subscriptions[client_id, event] = subscription
        if self._protocol is not None:
            self._catch_up(subscription)

    def unsubscribe(self, client_id, event):
        """
        Stop consuming (clientId, event); messages not yet handled go back
        to the queue.  The queue itself stays and keeps collecting messages.
        """
        del self._subscriptions[client_id, event]
        if self._protocol is not None:
            queue = {"clientId": client_id, "event": event}
            self._request({"event": "unsubscribe", "payload": queue}, None)

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
        if message_id in self._outbox:
            return self._outbox[message_id][1]
        d = defer.Deferred()
        self._outbox[message_id] = (frame, d)
        if self._protocol is not None:
            self._send_publish(message_id)
        return d

    # Connection events

    def _connected(self, protocol):
        self._protocol = protocol
        self.log.info("connected to the broker")
        if self.on_connect is not None:
            self.on_connect()
        # Acknowledgements first, so that the broker does not send those
        # messages again with the backlog.
        for key in self._acking:
            self._send_ack(key)
        for subscription in self._subscriptions.values():
            self._catch_up(subscription)
        for message_id in self._outbox:
            self._send_publish(message_id)

    def _disconnected(self, protocol):
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._requests.clear()
        self._catching_up.clear()
        if self.on_disconnect is not None:
            self.on_disconnect()

    def _request(self, frame, on_ok, on_error=None):
        request_id = next(self._ids)
        frame["id"] = request_id
        self._requests[request_id] = (on_ok, on_error)
        self._protocol.send(frame)

    def _catch_up(self, subscription):
        """
        Subscribe, which sends the backlog, then C{getAll}, whose answer
        comes after every message of the backlog: the end of the catch-up.
        """
        key = (subscription.client_id, subscription.event)
        queue = {"clientId": subscription.client_id, "event": subscription.event}
        if subscription.filter:
            self._request(
                {
                    "event": "subscribe",
                    "payload": dict(queue, filter=subscription.filter),
                },
                None,
            )
        else:
            self._request({"event": "subscribe", "payload": queue}, None)
        self._catching_up[key] = 0

        def caught_up(payload):
            count = self._catching_up.pop(key, 0)
            if subscription.on_caught_up is not None:
                subscription.on_caught_up(count)

        self._request({"event": "getAll", "payload": queue}, caught_up)

    def _send_publish(self, message_id):
        frame, d = self._outbox[message_id]

        def ok(payload):
            del self._outbox[message_id]
            d.callback(payload)
            self._check_idle()

        def refused(error):
            del self._outbox[message_id]
            d.errback(error)
            self._check_idle()

        self._request(dict(frame), ok, refused)

    # Frames from the broker

    def _frame_received(self, frame):
        event = frame.get("event")
        payload = frame.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        if event in ("ok", "error"):
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
        if subscription is None:
            # Sent before our unsubscribe reached the broker, which takes
            # it back.
            self.log.info("delivery for an unsubscribed queue {queue}", queue=key[:2])
            return
        d = defer.maybeDeferred(subscription.handler, delivery)
        self._working[key] = d

        def handled(_):
            del self._working[key]
            self._handled.add(key)
            self._ack(key)
            self._check_idle()

        def failed(failure):
            del self._working[key]
            self.log.failure(
                "handler failed for {queue} {messageId}; it will come again",
                failure,
                queue=key[:2],
                messageId=key[2],
            )
            self._check_idle()

        d.addCallbacks(handled, failed)

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
            confirmed,
        )
