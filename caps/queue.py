"""
One client's queue for one event: FIFO order, in-flight tracking, and the
place a returned message goes back to.  Pure data structure, no I/O.
"""

import heapq
import itertools
from collections import deque

import attrs

from caps.frames import DEAD_SUFFIX, encode_json

# Breaks ties in the returned heap: the same message can be there twice
# (given back, removed, then put back by a requeue).
_order = itertools.count()


@attrs.define(eq=False)
class Message:
    """
    A published message, shared by every queue it was routed to.  Nothing
    changes it once it is made (a frozen attrs class would take three times
    as long to build, and one is built for every publish).

    @ivar seq: the broker's publish counter: orders messages in every queue.
    @ivar payload: compact JSON bytes, encoded once at publish.
    @ivar time: when the broker accepted it, in seconds since the epoch.
    @ivar expires: when it goes to the dead letters unless delivered and
        acknowledged before, or L{None}.
    """

    id: str
    event: str
    payload: bytes
    seq: int
    time: float
    expires: float | None = None


@attrs.define(eq=False, slots=True)
class Entry:
    """
    A message's place in one queue.

    @ivar owner: the session it is in flight to, or L{None}.
    @ivar consumer: the subscription it was sent through, or L{None} (sent
        by C{getAll}, or not in flight).
    @ivar deliveries: how many times it has been sent to a consumer.
    @ivar removed: it was acknowledged, moved or its queue deleted; a
        removed entry still sitting in a ready structure is skipped when it
        comes up.
    @ivar delayed: given back with a delay (C{nack}); ready again when the
        delay is over.
    @ivar dead: for a dead letter, why and when it died: C{(reason, time)}.
    """

    message: Message
    queue: "Queue"
    owner: object = None
    consumer: object = None
    deliveries: int = 0
    removed: bool = False
    delayed: bool = False
    dead: tuple | None = None


@attrs.define(eq=False)
class Queue:
    """
    The messages of (clientId, event), oldest first.

    Fresh messages wait in a deque in publish order.  A message given back
    (its consumer went away) or moved here from another queue goes to a
    heap ordered by publish sequence, so it is sent again before anything
    newer; the next message to send is the older of the heap's smallest and
    the deque's first.  Acknowledging a ready message marks it removed
    instead of searching for it.

    @ivar qid: the queue's number in the store.
    @ivar filter: the subscription filter routing unaddressed messages here,
        or L{None}; only meaningful while C{subscribed}.
    @ivar max_length: the most messages it may hold, or L{None} for the
        broker's limit.
    @ivar consumers: the L{caps.sessions.Consumer}s of this queue.
    @ivar with_room: consumers that can take another message, in
        round-robin order (some may have filled up since; they are skipped).
    @ivar spilled: how many of its messages are in the store only (its
        tail, when it grew past the store's window), all published after
        C{last_seq}.
    @ivar last_seq: the sequence number of the last message appended.
    @ivar loading: its tail is being read back from the store.
    @ivar gone: sequence numbers above C{last_seq} removed while loading,
        which the load may still bring back.
    @ivar stale: a message above C{last_seq} was removed while not
        loading: its row may not be deleted in the store yet, so the next
        read waits until it is.
    """

    client_id: str
    event: str
    qid: int = 0
    filter: dict | None = None
    subscribed: bool = False
    max_length: int | None = None
    consumers: dict = attrs.Factory(dict)
    with_room: deque = attrs.Factory(deque)
    # How many of its messages can expire
    expiring: int = 0
    # Messages in flight now; published to it and sent from it, in all
    in_flight: int = 0
    published: int = 0
    delivered: int = 0
    spilled: int = 0
    last_seq: int = 0
    loading: bool = False
    gone: set = attrs.Factory(set)
    stale: bool = False
    # Sessions whose getAll waits for its tail to be read back
    waiting: dict = attrs.Factory(dict)
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

    @property
    def holds_dead_letters(self):
        """
        Whether this is a dead-letter queue (its event ends in C{.dead}):
        its messages never die again.
        """
        return self.event.endswith(DEAD_SUFFIX)

    def __len__(self):
        """
        How many messages the queue holds, ready or in flight, in memory
        or in the store only.
        """
        return len(self._entries) + self.spilled

    @property
    def in_memory(self):
        """
        How many of its messages are in memory.
        """
        return len(self._entries)

    @property
    def ready_in_memory(self):
        """
        About how many fresh messages are ready in memory (an upper bound:
        acknowledged ones may still be counted).
        """
        return len(self._fresh)

    def __contains__(self, message_id):
        return message_id in self._entries

    def append(self, message, deliveries=0):
        """
        Add a message at the end: newly published, or loaded from a store
        with the number of times it was sent before.
        """
        entry = Entry(message, self, None, None, deliveries)
        self._entries[message.id] = entry
        self._fresh.append(entry)
        self.last_seq = message.seq
        if message.expires is not None:
            self.expiring += 1
        return entry

    def recover(self):
        """
        After a restart: no consumers, and every message ready again.
        """
        self.consumers.clear()
        self.with_room.clear()
        for entry in self._entries.values():
            if entry.owner is not None or entry.delayed:
                entry.consumer = None
                self.give_back(entry)

    def entries(self):
        """
        Every message's entry, in no particular order.
        """
        return self._entries.values()

    def insert(self, message, deliveries=0):
        """
        Add a message at its place by publish order, among the others (a
        message moved here from another queue).
        """
        entry = Entry(message, self, deliveries=deliveries)
        self._entries[message.id] = entry
        heapq.heappush(self._returned, (message.seq, next(_order), entry))
        if message.expires is not None:
            self.expiring += 1
        return entry

    def _head(self):
        """
        Where the oldest ready message is: C{"returned"}, C{"fresh"} or
        L{None}, dropping removed entries from the fronts on the way.
        """
        returned = self._returned
        fresh = self._fresh
        while returned and returned[0][2].removed:
            heapq.heappop(returned)
        while fresh and fresh[0].removed:
            fresh.popleft()
        if returned and (not fresh or returned[0][0] < fresh[0].message.seq):
            return "returned"
        if fresh:
            return "fresh"
        return None

    def peek_ready(self):
        """
        The oldest ready message's entry, left in place; or L{None}.
        """
        head = self._head()
        if head == "returned":
            return self._returned[0][2]
        if head == "fresh":
            return self._fresh[0]
        return None

    def pop_ready(self):
        """
        Take the oldest ready message, or return L{None} if there is none.

        The caller marks it in flight by setting its C{owner}.
        """
        if not self._returned:
            fresh = self._fresh
            while fresh:
                entry = fresh.popleft()
                if not entry.removed:
                    return entry
            return None
        head = self._head()
        if head == "returned":
            return heapq.heappop(self._returned)[2]
        if head == "fresh":
            return self._fresh.popleft()
        return None

    def get(self, message_id):
        """
        The entry of a message in this queue, or L{None}.
        """
        return self._entries.get(message_id)

    def give_back(self, entry):
        """
        Put an in-flight or delayed message back at its original place.
        """
        entry.owner = None
        entry.delayed = False
        heapq.heappush(self._returned, (entry.message.seq, next(_order), entry))

    def remove(self, message_id):
        """
        Delete a message, ready or in flight.

        @return: the removed L{Entry}, or L{None} if the queue did not hold
            that message.
        """
        entry = self._entries.pop(message_id, None)
        if entry is not None:
            entry.removed = True
            if entry.message.seq > self.last_seq:
                # Moved here from the dead letters: its row is past the
                # messages in memory, where a read of the tail may find it.
                if self.loading:
                    self.gone.add(entry.message.seq)
                else:
                    self.stale = True
            if entry.message.expires is not None:
                self.expiring -= 1
            if not self._entries:
                # Nothing left: drop the removed entries still waiting in
                # the ready structures.
                self._fresh.clear()
                self._returned.clear()
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
        self.expiring = 0
        self.spilled = 0
        return entries
