"""
One client's queue for one event: FIFO order, in-flight tracking, and the
place a returned message goes back to.  Pure data structure, no I/O.
"""

import heapq
from collections import deque

import attrs

from caps.frames import encode_json


@attrs.frozen
class Message:
    """
    A published message, shared by every queue it was routed to.

    @ivar seq: the broker's publish counter: orders messages in every queue.
    @ivar payload: compact JSON bytes, encoded once at publish.
    @ivar time: when the broker accepted it, in seconds since the epoch.
    """

    id: str
    event: str
    payload: bytes
    seq: int
    time: float
    id_json: bytes = attrs.field(
        init=False,
        eq=False,
        default=attrs.Factory(lambda self: encode_json(self.id), takes_self=True),
    )


@attrs.define(eq=False, slots=True)
class Entry:
    """
    A message's place in one queue.

    @ivar owner: the connection it is in flight to, or L{None} when ready.
    @ivar deliveries: how many times it has been sent to a consumer.
    @ivar removed: it was acknowledged or its queue deleted; a removed entry
        still sitting in a ready structure is skipped when it comes up.
    """

    message: Message
    queue: "Queue"
    owner: object = None
    deliveries: int = 0
    removed: bool = False


@attrs.define(eq=False)
class Queue:
    """
    The messages of (clientId, event), oldest first.

    Fresh messages wait in a deque in publish order.  A message given back
    (its consumer went away) goes to a heap ordered by publish sequence, so
    it is sent again before anything newer: since messages leave the deque
    only from the front, every returned message is older than every fresh
    one, and the next message to send is the heap's smallest if there is
    one, else the deque's first.  Acknowledging a ready message marks it
    removed instead of searching for it.

    @ivar qid: the queue's number in the store.
    @ivar filter: the subscription filter routing unaddressed messages here,
        or L{None}; only meaningful while C{subscribed}.
    @ivar consumers: connections consuming this queue, in round-robin order.
    """

    client_id: str
    event: str
    qid: int = 0
    filter: dict | None = None
    subscribed: bool = False
    consumers: deque = attrs.Factory(deque)
    _entries: dict = attrs.Factory(dict)
    _fresh: deque = attrs.Factory(deque)
    _returned: list = attrs.Factory(list)
    # Encoded once: written in every delivery frame.
    client_json: bytes = attrs.field(init=False)
    event_json: bytes = attrs.field(init=False)

    def __attrs_post_init__(self):
        self.client_json = encode_json(self.client_id)
        self.event_json = encode_json(self.event)

    @property
    def key(self):
        return (self.client_id, self.event)

    def __len__(self):
        """
        How many messages the queue holds, ready or in flight.
        """
        return len(self._entries)

    def __contains__(self, message_id):
        return message_id in self._entries

    def append(self, message, deliveries=0):
        """
        Add a message at the end: newly published, or loaded from a store
        with the number of times it was sent before.
        """
        entry = Entry(message, self, deliveries=deliveries)
        self._entries[message.id] = entry
        self._fresh.append(entry)
        return entry

    def recover(self):
        """
        After a restart: no consumers, and every message ready again.
        """
        self.consumers.clear()
        for entry in self._entries.values():
            if entry.owner is not None:
                self.give_back(entry)

    def entries(self):
        """
        Every message's entry, in no particular order.
        """
        return self._entries.values()

    def pop_ready(self):
        """
        Take the oldest ready message, or return L{None} if there is none.

        The caller marks it in flight by setting its C{owner}.
        """
        returned = self._returned
        while returned:
            entry = heapq.heappop(returned)[1]
            if not entry.removed:
                return entry
        fresh = self._fresh
        while fresh:
            entry = fresh.popleft()
            if not entry.removed:
                return entry
        return None

    def give_back(self, entry):
        """
        Put an in-flight message back at its original place.
        """
        entry.owner = None
        heapq.heappush(self._returned, (entry.message.seq, entry))

    def remove(self, message_id):
        """
        Delete a message, ready or in flight.

        @return: the removed L{Entry}, or L{None} if the queue did not hold
            that message.
        """
        entry = self._entries.pop(message_id, None)
        if entry is not None:
            entry.removed = True
        return entry

    def clear(self):
        """
        Delete every message; return the removed entries.
        """
        entries = list(self._entries.values())
        for entry in entries:
            entry.removed = True
        self._entries.clear()
        self._fresh.clear()
        self._returned.clear()
        return entries
