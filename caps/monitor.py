"""
What the broker tells its observers: running totals, the recent messages
(a bounded log, so a page opened late can catch up before it goes live),
and snapshots of its queues and clients.  Pure data; the web pages, the
JSON API and the metrics read it.
"""

import json
from collections import deque

import attrs
from twisted.logger import Logger

# Messages kept in the recent log, and bytes of their payloads, at most.
RECENT = 10_000
RECENT_BYTES = 32 * 1024 * 1024


@attrs.define
class Totals:
    """
    Running totals since the broker started.
    """

    published: int = 0
    delivered: int = 0
    redelivered: int = 0
    acknowledged: int = 0
    dead_lettered: int = 0


@attrs.define(eq=False)
class Recent:
    """
    One message in the recent log.

    @ivar message: the L{caps.queue.Message}.
    @ivar recipients: the clientIds of the queues it went to.
    @ivar sender: the clientId its publisher logged in as, or L{None}.
    """

    message: object
    recipients: tuple
    sender: str | None
    _payload: dict | None = None

    @property
    def seq(self):
        return self.message.seq

    def involves(self, client_id):
        """
        Whether C{client_id} sent it or gets it; on an open broker (no
        sender known), also whether its payload names C{client_id} as its
        C{store} (a pickup names the store it is for).  With logins, a
        payload cannot put a message on another client's page.
        """
        if client_id == self.sender or client_id in self.recipients:
            return True
        return (
            self.sender is None
            and b'"store"' in self.message.payload
            and self.payload().get("store") == client_id
        )

    def payload(self):
        """
        The payload, decoded once.
        """
        if self._payload is None:
            value = json.loads(self.message.payload)
            self._payload = value if isinstance(value, dict) else {}
        return self._payload

    def as_json(self):
        message = self.message
        return {
            "seq": message.seq,
            "time": message.time,
            "event": message.event,
            "messageId": message.id,
            "recipients": list(self.recipients),
            "sender": self.sender,
            "payload": self.payload(),
        }


@attrs.define(eq=False)
class Monitor:
    """
    The totals, and the recent log with the callables told of each new
    message in it (live pages): C{listeners} of every message, and
    C{watchers} of the messages involving one clientId (see L{watch}), so
    that a publish costs nothing for the pages of other clients.
    """

    size: int = RECENT
    max_bytes: int = RECENT_BYTES
    log = Logger()
    totals: Totals = attrs.Factory(Totals)
    recent: deque = attrs.field(init=False)
    listeners: set = attrs.Factory(set)
    watchers: dict = attrs.Factory(dict)
    # Bytes of the payloads in the recent log
    _bytes: int = 0

    def __attrs_post_init__(self):
        self.recent = deque(maxlen=self.size)

    def watch(self, client_id, listener):
        """
        Call C{listener} with each new message that involves C{client_id}
        (as L{Recent.involves} says), until L{unwatch}ed.
        """
        self.watchers.setdefault(client_id, set()).add(listener)

    def unwatch(self, client_id, listener):
        listeners = self.watchers.get(client_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self.watchers[client_id]

    def published(self, message, queues, sender=None):
        """
        C{message} was published into C{queues} (a list the caller does not
        change afterwards) by C{sender}.  The log keeps the three as they
        are, a tuple each: this runs for every publish, and a L{Recent} is
        made only when someone reads the log or listens.
        """
        self.totals.published += 1
        recent = self.recent
        if len(recent) == self.size:
            self._bytes -= len(recent[0][0].payload)
        recent.append((message, queues, sender))
        self._bytes += len(message.payload)
        if self._bytes > self.max_bytes:
            while self._bytes > self.max_bytes and len(recent) > 1:
                self._bytes -= len(recent.popleft()[0].payload)
        if self.listeners or self.watchers:
            self._tell(_recent((message, queues, sender)))

    def _tell(self, entry):
        told = list(self.listeners)
        watchers = self.watchers
        if watchers:
            sender = entry.sender
            involved = {*entry.recipients, sender}
            if sender is None and b'"store"' in entry.message.payload:
                involved.add(entry.payload().get("store"))
            for client_id in involved:
                told.extend(watchers.get(client_id, ()))
        for listener in told:
            # An observer's failure is its own: the publish goes on.
            try:
                listener(entry)
            except Exception:
                self.log.failure("a listener of new messages failed")

    @property
    def last(self):
        """
        The sequence number of the newest message in the recent log, or
        L{None} if it is empty.
        """
        return self.recent[-1][0].seq if self.recent else None

    @property
    def oldest(self):
        """
        The sequence number of the oldest message still in the recent log,
        or L{None} if it is empty.
        """
        return self.recent[0][0].seq if self.recent else None

    def since(self, after=0, client_id=None):
        """
        The recent messages after sequence number C{after}, oldest first;
        only those that involve C{client_id}, if given.
        """
        found = [_recent(r) for r in self.recent if r[0].seq > after]
        if client_id is not None:
            found = [r for r in found if r.involves(client_id)]
        return found


def _recent(logged):
    message, queues, sender = logged
    return Recent(message, tuple(queue.client_id for queue in queues), sender)


def queue_row(broker, queue, now):
    """
    One queue as the operator's page shows it.
    """
    dead = broker.queue(queue.client_id, queue.event + ".dead")
    head = queue.ready_head()
    return {
        "clientId": queue.client_id,
        "event": queue.event,
        "depth": len(queue),
        "inFlight": queue.in_flight,
        "deadLetters": len(dead) if dead is not None else 0,
        "consumers": len(queue.consumers),
        "subscribed": queue.subscribed,
        "oldestAge": (now - head[1]) if head is not None else None,
        "published": queue.published,
        "delivered": queue.delivered,
    }
