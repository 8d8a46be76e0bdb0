"""
The broker: subscriptions, routing, per-client queues and in-flight
tracking.  Pure logic: it knows nothing of bytes, sockets or the reactor;
it talks to connections through L{IConnection} and reads time from an
injected clock.
"""

import json
import uuid
from datetime import datetime, timezone

import attrs
from twisted.logger import Logger
from zope.interface import Interface

from caps.queue import Message, Queue
from caps.routing import SubscriptionIndex
from caps.store import UNAVAILABLE, State, StoreUnavailable
from caps.store.memory import MemoryStore

DEDUPE_WINDOW = 600.0


class IConnection(Interface):
    """
    A client connection, as the broker sees it.
    """

    def deliver(entry):
        """
        Send one message to the client.

        @param entry: a L{caps.queue.Entry}: C{entry.queue} names the queue
            (clientId, event), C{entry.message} is the message, and
            C{entry.deliveries} counts this delivery (more than 1 means it
            was sent before).
        """


@attrs.define(eq=False)
class _Session:
    """
    What the broker tracks for one connection.

    @ivar consuming: the queues it consumes (a dict used as an ordered set).
    @ivar in_flight: the entries sent to it and not yet acknowledged.
    """

    connection: object
    consuming: dict = attrs.Factory(dict)
    in_flight: dict = attrs.Factory(dict)


class _EventRecord:
    """
    The hub's C{EVENT} log line, formatted only if an observer formats it.
    """

    __slots__ = ("message",)

    def __init__(self, message):
        self.message = message

    def __format__(self, spec):
        m = self.message
        when = datetime.fromtimestamp(m.time, timezone.utc).isoformat()
        return (
            f'{{"event": {json.dumps(m.event)}, "time": "{when}", '
            f'"payload": {m.payload.decode("utf-8")}}}'
        )


@attrs.define(eq=False)
class Broker:
    """
    Routes published messages to queues and queues to consumers.

    @ivar clock: an C{IReactorTime}, for message times and the dedupe
        window.
    @ivar dedupe_window: how long, in seconds, a client-given messageId is
        remembered after it was published (and, beyond that, as long as its
        message is in a queue).
    """

    clock: object
    store: object = attrs.Factory(MemoryStore)
    dedupe_window: float = DEDUPE_WINDOW
    log = Logger()
    _state: State = attrs.field(init=False)
    _index: SubscriptionIndex = attrs.Factory(SubscriptionIndex)
    _sessions: dict = attrs.Factory(dict)
    _id_prefix: str = attrs.Factory(lambda: uuid.uuid4().hex[:12] + "-")

    def __attrs_post_init__(self):
        """
        Take the state the store kept: every queue with its subscription,
        every message ready again in its place.
        """
        self._state = self.store.load()
        for queue in self._state.queues.values():
            queue.recover()
            if queue.subscribed:
                self._index.add(queue, queue.filter)

    @property
    def _queues(self):
        return self._state.queues

    @property
    def _live(self):
        return self._state.live

    @property
    def _seen(self):
        return self._state.seen

    def queue(self, client_id, event):
        """
        The queue (clientId, event), or L{None} if there is none.
        """
        return self._queues.get((client_id, event))

    def _queue(self, client_id, event):
        queue = self._queues.get((client_id, event))
        if queue is None:
            state = self._state
            queue = Queue(client_id, event, state.next_qid)
            state.next_qid += 1
            self._queues[client_id, event] = queue
            self.store.queue_saved(queue)
        return queue

    def connect(self, connection):
        """
        Start tracking a connection.
        """
        self._sessions[connection] = _Session(connection)

    def disconnect(self, connection):
        """
        Forget a connection: it stops consuming, and every message in flight
        to it goes back to its place in its queue, to be sent again.
        """
        session = self._sessions.pop(connection)
        for queue in session.consuming:
            queue.consumers.remove(connection)
        returned = {}
        for entry in session.in_flight:
            entry.queue.give_back(entry)
            returned[entry.queue] = None
        for queue in returned:
            self._pump(queue)

    def subscribe(self, connection, client_id, event, filter=None):
        """
        Make C{connection} a consumer of (clientId, event), creating the
        queue if needed, and route matching messages to it from now on.
        """
        self._check_writable()
        queue = self._queue(client_id, event)
        if not queue.subscribed or queue.filter != filter:
            queue.filter = filter
            queue.subscribed = True
            self._index.add(queue, filter)
            self.store.queue_saved(queue)
        session = self._sessions[connection]
        if queue not in session.consuming:
            session.consuming[queue] = None
            queue.consumers.append(connection)
        self._pump(queue)
        return {"clientId": client_id, "event": event, "messages": len(queue)}

    def unsubscribe(self, connection, client_id, event, delete=False):
        """
        Stop C{connection} consuming (clientId, event); the messages in
        flight to it from that queue go back.  With C{delete}, remove the
        queue, its subscription and its messages.
        """
        self._check_writable()
        queue = self._queues.get((client_id, event))
        if queue is None:
            return {"clientId": client_id, "event": event, "deleted": False}
        session = self._sessions[connection]
        if queue in session.consuming:
            del session.consuming[queue]
            queue.consumers.remove(connection)
        if delete:
            self._delete(queue)
        else:
            for entry in [e for e in session.in_flight if e.queue is queue]:
                del session.in_flight[entry]
                queue.give_back(entry)
            self._pump(queue)
        return {"clientId": client_id, "event": event, "deleted": delete}

    def _delete(self, queue):
        del self._queues[queue.key]
        self._index.remove(queue)
        self.store.queue_dropped(queue)
        for connection in queue.consumers:
            del self._sessions[connection].consuming[queue]
        queue.consumers.clear()
        for entry in queue.clear():
            if entry.owner is not None:
                del self._sessions[entry.owner].in_flight[entry]
            self._release(entry.message)

    def get_all(self, connection, client_id, event):
        """
        Send C{connection} every ready message of (clientId, event), oldest
        first; they are in flight to it until acknowledged.
        """
        queue = self._queues.get((client_id, event))
        count = 0
        if queue is not None:
            session = self._sessions[connection]
            while (entry := queue.pop_ready()) is not None:
                self._send(session, entry)
                count += 1
        return {"clientId": client_id, "event": event, "count": count}

    def received(self, client_id, event, message_id):
        """
        Delete an acknowledged message from (clientId, event); an unknown
        or already deleted messageId is not an error.
        """
        self._check_writable()
        queue = self._queues.get((client_id, event))
        entry = queue.remove(message_id) if queue is not None else None
        if entry is not None:
            if entry.owner is not None:
                del self._sessions[entry.owner].in_flight[entry]
            self.store.entry_removed(queue, entry.message)
            self._release(entry.message)
        return {
            "clientId": client_id,
            "event": event,
            "messageId": message_id,
            "deleted": entry is not None,
        }

    def publish(self, event, payload, body, to=(), message_id=None):
        """
        Route a message to the queues of the clientIds in C{to} and to every
        subscribed queue whose filter it matches.

        @param payload: the decoded payload, for filters.
        @param body: the payload as encoded JSON bytes, sent as is.
        """
        self._check_writable()
        now = self.clock.seconds()
        self._forget_old_ids(now)
        if message_id is None:
            message_id = self._new_id()
        elif message_id in self._live or message_id in self._seen:
            return {"messageId": message_id, "queues": 0, "duplicate": True}
        else:
            expires = now + self.dedupe_window
            self._seen[message_id] = expires
            self.store.id_remembered(message_id, expires)
        self._state.seq += 1
        message = Message(message_id, event, body, self._state.seq, now)
        queues = dict.fromkeys(self._queue(client_id, event) for client_id in to)
        queues.update(dict.fromkeys(self._index.match(event, payload)))
        self.log.info("EVENT {record}", record=_EventRecord(message))
        if queues:
            self._live[message_id] = len(queues)
            self.store.message_added(message, queues)
            for queue in queues:
                queue.append(message)
                self._pump(queue)
        return {"messageId": message_id, "queues": len(queues)}

    def _check_writable(self):
        if not self.store.available:
            raise StoreUnavailable(UNAVAILABLE)

    def _new_id(self):
        """
        A messageId no message has: the broker's random prefix and the next
        sequence number, skipping any a client chose for itself.
        """
        seq = self._state.seq + 1
        while (
            message_id := f"{self._id_prefix}{seq}"
        ) in self._live or message_id in self._seen:
            seq += 1
        return message_id

    def _forget_old_ids(self, now):
        seen = self._seen
        while seen:
            message_id, expires = next(iter(seen.items()))
            if expires > now:
                break
            del seen[message_id]

    def _release(self, message):
        count = self._live[message.id] - 1
        if count:
            self._live[message.id] = count
        else:
            del self._live[message.id]
            self.store.message_dropped(message)

    def _pump(self, queue):
        """
        Send ready messages of C{queue} to its consumers, round robin.
        """
        consumers = queue.consumers
        while consumers:
            entry = queue.pop_ready()
            if entry is None:
                return
            connection = consumers[0]
            consumers.rotate(-1)
            self._send(self._sessions[connection], entry)

    def _send(self, session, entry):
        entry.owner = session.connection
        entry.deliveries += 1
        self.store.delivered(entry)
        session.in_flight[entry] = None
        session.connection.deliver(entry)
