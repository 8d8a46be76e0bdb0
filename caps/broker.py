"""
The broker: subscriptions, routing, per-client queues and in-flight
tracking.  Pure logic: it knows nothing of bytes, sockets or the reactor;
it talks to connections through L{IConnection} and reads time from an
injected clock.
"""

import uuid

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from caps.delivery import Delivery
from caps.eventlog import EventLog
from caps.frames import DEAD_SUFFIX, ProtocolError
from caps.monitor import Monitor
from caps.observed import Observed
from caps.paging import Paging
from caps.publishing import Publishing, QueueFull
from caps.queue import Queue
from caps.routing import SubscriptionIndex
from caps.sessions import Catchup, Consumer, IConnection, Session
from caps.store import UNAVAILABLE, State, StoreUnavailable
from caps.store.memory import MemoryStore
from caps.timers import Deadlines

DEDUPE_WINDOW = 600.0
ACK_TIMEOUT = 30.0
PREFETCH = 1000
MAX_DELIVERIES = 20
MAX_QUEUE = 1_000_000
MAX_SUBSCRIPTIONS = 1000
MAX_UNACKED = 10_000

__all__ = ["Broker", "IConnection", "QueueFull", "TooManySubscriptions"]


class TooManySubscriptions(ProtocolError):
    """
    A connection asked to consume more queues than the broker allows.
    """

    code = "too-many-subscriptions"


@attrs.define(eq=False)
class Broker(Publishing, Delivery, Paging, Observed):
    """
    Routes published messages to queues and queues to consumers.

    @ivar clock: an C{IReactorTime}, for message times, the dedupe window,
        ack timeouts, nack delays and expiry.
    @ivar dedupe_window: how long, in seconds, a client-given messageId is
        remembered after it was published (and, beyond that, as long as its
        message is in a queue).
    @ivar ack_timeout: default seconds a delivered message may stay
        unacknowledged before it goes back to its queue; 0 for never.
    @ivar prefetch: default most messages in flight to one consumer.
    @ivar max_deliveries: deliveries after which a message that comes back
        goes to the dead letters instead.
    @ivar max_queue: the most messages any queue may hold.
    @ivar max_subscriptions: the most queues one connection may consume.
    @ivar max_unacked: the most messages in flight to one connection, all
        its consumers and C{getAll}s together.
    @ivar default_ttl: seconds a message lives if its publish gives no
        C{ttl}; L{None} for ever.
    @ivar log_events: log every published message (C{EVENT {...}}).
    """

    clock: object
    store: object = attrs.Factory(MemoryStore)
    dedupe_window: float = DEDUPE_WINDOW
    ack_timeout: float = ACK_TIMEOUT
    prefetch: int = PREFETCH
    max_deliveries: int = MAX_DELIVERIES
    max_queue: int = MAX_QUEUE
    max_subscriptions: int = MAX_SUBSCRIPTIONS
    max_unacked: int = MAX_UNACKED
    default_ttl: float | None = None
    log_events: bool = True
    monitor: Monitor = attrs.Factory(Monitor)
    log = Logger()
    _state: State = attrs.field(init=False)
    _index: SubscriptionIndex = attrs.Factory(SubscriptionIndex)
    _sessions: dict = attrs.Factory(dict)
    _id_prefix: str = attrs.Factory(lambda: uuid.uuid4().hex[:12] + "-")
    # Holders (consumers, sessions) whose oldest unacknowledged message
    # has an ack timeout to watch
    _timeouts: Deadlines = attrs.field(init=False)
    # Entries given back with a delay
    _delays: Deadlines = attrs.field(init=False)
    # Queues that hold messages that can expire, and the sweep that looks
    _expiring: dict = attrs.Factory(dict)
    _sweep: task.LoopingCall = attrs.field(init=False)
    _events: EventLog = attrs.field(init=False)
    # Queues whose failed read of their tail is to be tried again
    _retries: dict = attrs.Factory(dict)
    # clientId -> its queues (a dict used as a set), for observers
    _by_client: dict = attrs.Factory(dict)

    def __attrs_post_init__(self):
        """
        Take the state the store kept: every queue with its subscription,
        every message ready again in its place.
        """
        self._timeouts = Deadlines(self.clock, self._check_timeouts)
        self._delays = Deadlines(self.clock, self._delay_over)
        self._sweep = task.LoopingCall(self._sweep_expired)
        self._sweep.clock = self.clock
        self._events = EventLog(self.clock, self.log)
        self._state = self.store.load()
        queues = list(self._state.queues.values())
        self._count_live(queues)
        for queue in queues:
            self._by_client.setdefault(queue.client_id, {})[queue] = None
        for queue in queues:
            queue.recover()
            if queue.subscribed:
                self._index.add(queue, queue.filter)
            if queue.expiring:
                self._watch_expiry(queue)
        # Only once no queue has a consumer left from before: messages sent
        # their last time just before the broker stopped are dead letters.
        for queue in queues:
            if not queue.holds_dead_letters:
                for entry in list(queue.entries()):
                    if entry.deliveries >= self.max_deliveries:
                        self._dead_letter(entry, "max-deliveries")

    def _count_live(self, queues):
        """
        Count again the queues holding each message in memory, as this
        broker counts them (see L{_counted}): a broker started on the state
        of another (the memory store's, in the same process) did not make
        those messageIds, so it counts them all.
        """
        live = self._state.live
        live.clear()
        prefix = self._id_prefix
        for queue in queues:
            for seq, message_id in queue.message_ids():
                if message_id != f"{prefix}{seq}":
                    live[message_id] = live.get(message_id, 0) + 1

    def stop(self):
        """
        Stop every timer (the broker is going away), and log the last
        events.
        """
        self._events.flush()
        self._stop_paging()
        self._timeouts.stop()
        self._delays.stop()
        if self._sweep.running:
            self._sweep.stop()

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
            self._by_client.setdefault(client_id, {})[queue] = None
            self.store.queue_saved(queue)
        return queue

    def _check_writable(self):
        if not self.store.available:
            raise StoreUnavailable(UNAVAILABLE)

    # Connections

    def connect(self, connection):
        """
        Start tracking a connection.
        """
        self._sessions[connection] = Session(
            connection, self.ack_timeout, self.max_unacked
        )

    def disconnect(self, connection):
        """
        Forget a connection: it stops consuming, and every message in flight
        to it goes back to its place in its queue, to be sent again.
        """
        session = self._sessions.pop(connection)
        session.paused = True
        session.catchups.clear()
        for consumer in session.consuming.values():
            self._drop_consumer(consumer)
        returned = {}
        for entry in list(session.in_flight):
            self._take_back(entry)
            self._return(entry)
            returned[entry.queue] = None
        for queue in returned:
            self._pump(queue)

    def pause(self, connection):
        """
        The connection cannot take more now (its send buffer is full):
        send it nothing until L{resume}.
        """
        self._sessions[connection].paused = True

    def resume(self, connection):
        """
        The connection can take more again.
        """
        session = self._sessions.get(connection)
        if session is None or not session.paused:
            return
        session.paused = False
        if not session.full:
            self._unblocked(session)

    def _unblocked(self, session):
        """
        A session can take messages again: fill its consumers' windows
        and go on with its C{getAll}s.
        """
        for consumer in session.consuming.values():
            self._list(consumer)
            self._pump(consumer.queue)
        self._continue_catchups(session)

    # Consuming

    def subscribe(
        self,
        connection,
        client_id,
        event,
        filter=None,
        prefetch=None,
        ack_timeout=None,
        max_length=None,
    ):
        """
        Make C{connection} a consumer of (clientId, event), creating the
        queue if needed, and route matching messages to it from now on.

        @param prefetch: the most messages in flight to this consumer.
        @param ack_timeout: seconds before an unacknowledged message goes
            back; 0 for never.
        @param max_length: the most messages the queue may hold.
        """
        self._check_writable()
        session = self._sessions[connection]
        known = self._queues.get((client_id, event))
        if (known is None or known not in session.consuming) and len(
            session.consuming
        ) >= self.max_subscriptions:
            raise TooManySubscriptions(
                f"a connection may consume at most {self.max_subscriptions} queues"
            )
        queue = self._queue(client_id, event)
        if (
            not queue.subscribed
            or queue.filter != filter
            or queue.max_length != max_length
        ):
            queue.filter = filter
            queue.subscribed = True
            queue.max_length = max_length
            self._index.add(queue, filter)
            self.store.queue_saved(queue)
        prefetch = prefetch or self.prefetch
        ack_timeout = self.ack_timeout if ack_timeout is None else ack_timeout
        consumer = session.consuming.get(queue)
        if consumer is None:
            consumer = Consumer(session, queue, prefetch, ack_timeout)
            session.consuming[queue] = consumer
            queue.consumers[consumer] = None
        else:
            consumer.prefetch = prefetch
            if ack_timeout != consumer.ack_timeout:
                self._retime(consumer, ack_timeout)
        self._list(consumer)
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
        consumer = session.consuming.pop(queue, None)
        if consumer is not None:
            self._drop_consumer(consumer)
        if delete:
            self._delete(queue)
        else:
            for entry in [e for e in session.in_flight if e.queue is queue]:
                self._take_back(entry)
                self._return(entry)
            self._pump(queue)
        return {"clientId": client_id, "event": event, "deleted": delete}

    def _drop_consumer(self, consumer):
        queue = consumer.queue
        del queue.consumers[consumer]
        if consumer.listed:
            queue.with_room.remove(consumer)
            consumer.listed = False
        consumer.prefetch = 0

    def _delete(self, queue):
        del self._queues[queue.key]
        mine = self._by_client[queue.client_id]
        del mine[queue]
        if not mine:
            del self._by_client[queue.client_id]
        self._index.remove(queue)
        self._expiring.pop(queue, None)
        self.store.queue_dropped(queue)
        for consumer in list(queue.consumers):
            del consumer.session.consuming[queue]
            self._drop_consumer(consumer)
        queue.with_room.clear()
        for entry in queue.clear():
            if entry.owner is not None:
                self._take_back(entry)
            self._release(entry.message)
        # getAlls waiting for its tail to be read back end here.
        self._resume_waiting(queue)

    def get_all(self, connection, client_id, event):
        """
        Send C{connection} every ready message of (clientId, event), oldest
        first, as fast as it takes them; they are in flight to it until
        acknowledged.

        @return: a L{Deferred} firing with the answer once the queue has no
            ready message left (at once, if it had none).
        """
        done = defer.Deferred()
        queue = self._queues.get((client_id, event))

        def finished(count):
            done.callback({"clientId": client_id, "event": event, "count": count})

        if queue is None:
            finished(0)
            return done
        session = self._sessions[connection]
        session.catchups.append(Catchup(queue, self._state.seq, finished))
        if len(session.catchups) == 1:
            self._continue_catchups(session)
        return done

    def _continue_catchups(self, session):
        while session.catchups and not session.paused:
            catchup = session.catchups[0]
            queue = catchup.queue
            while not (session.paused or session.full):
                entry = self._next_ready(queue, catchup.until)
                if entry is None:
                    break
                self._send(session, entry, None)
                catchup.count += 1
            if session.paused:
                return
            if session.full:
                # Sent up to the connection's limit: the rest waits for
                # acknowledgements, unless there is no rest.
                head = queue.ready_head()
                if head is not None and head[0] <= catchup.until:
                    return
            if queue.spilled and queue.last_seq < catchup.until:
                # The rest it covers is still in the store.
                queue.waiting[session] = None
                self._refill(queue)
                return
            session.catchups.popleft()
            catchup.done(catchup.count)

    def received(self, client_id, event, message_id):
        """
        Delete an acknowledged message from (clientId, event); an unknown
        or already deleted messageId is not an error.
        """
        self._check_writable()
        queues = self._state.queues
        queue = queues.get((client_id, event))
        entry = queue.remove(message_id) if queue is not None else None
        if entry is None and not event.endswith(DEAD_SUFFIX):
            # Acknowledged late, after it died: it was handled after all.
            dead = queues.get((client_id, event + DEAD_SUFFIX))
            entry = dead.remove(message_id) if dead is not None else None
            if entry is not None:
                queue = dead
        answer = {
            "clientId": client_id,
            "event": event,
            "messageId": message_id,
            "deleted": entry is not None,
        }
        if entry is not None:
            self._removed(queue, entry)
        elif queue is not None and queue.spilled:
            # Perhaps one of the messages only the store has.
            return self._remove_spilled(queue, message_id, answer)
        return answer

    def _removed(self, queue, entry):
        """
        An entry was removed from C{queue}'s memory: acknowledged.
        """
        if entry.owner is not None:
            self._take_back(entry)
        self.monitor.totals.acknowledged += 1
        self.store.entry_removed(queue, entry.message)
        self._release(entry.message)
        self._pump(queue)
