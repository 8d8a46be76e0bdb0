"""
One client's queue for one event: FIFO order, in-flight tracking, and the
place a returned message goes back to.  Pure data structure, no I/O.
"""

import heapq
import itertools
from collections import deque

import attrs

from caps.frames import DEAD_SUFFIX, encode_json
from caps.message import Message
from caps.packed import Fresh, head_of, seq_of

__all__ = ["Entry", "Message", "Queue"]

# Breaks ties in the returned heap: the same message can be there twice
# (given back, removed, then put back by a requeue).
_order = itertools.count()


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

    Fresh messages (never sent) wait packed (L{caps.packed.Fresh}) in
    publish order, with no L{Entry}: one is made when a message is taken
    to be sent, and kept in C{_entries} until the message is removed.  A
    message given back (its consumer went away), moved here from another
    queue or read from a store with deliveries or a death goes to a heap
    ordered by publish sequence, so it is sent again before anything newer;
    the next message to send is the older of the heap's smallest and the
    first fresh one.  Acknowledging an entry that is ready marks it removed
    instead of searching the heap for it.

    L{entries}, L{get}, L{peek_ready}, L{remove} and L{clear} answer for a
    fresh message with an entry made for the occasion, not kept: changing
    it changes nothing in the queue.

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
    # Messages with an entry: messageId -> Entry
    _entries: dict = attrs.Factory(dict)
    _fresh: Fresh = attrs.Factory(lambda self: Fresh(self.event), takes_self=True)
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
        return len(self._entries) + self._fresh.count + self.spilled

    @property
    def in_memory(self):
        """
        How many of its messages are in memory.
        """
        return len(self._entries) + self._fresh.count

    @property
    def ready_in_memory(self):
        """
        About how many fresh messages are ready in memory (an upper bound:
        acknowledged ones may still be counted, but none at the head).
        """
        fresh = self._fresh
        fresh.first()
        return fresh.slots

    def __contains__(self, message_id):
        return message_id in self._entries or self._fresh.find(message_id) >= 0

    def append(self, message, deliveries=0, dead=None, numbered=False):
        """
        Add a message at the end: newly published, or loaded from a store
        with the number of times it was sent before and, for a dead letter,
        why and when it died.  C{numbered} tells that its messageId is
        known to end in "-<its seq>" (one the broker made), which saves
        looking.

        @return: its L{Entry} if it has one now (sent before, or dead), or
            L{None} (kept packed).
        """
        self.last_seq = message.seq
        if message.expires is not None:
            self.expiring += 1
        if not deliveries and dead is None:
            self._fresh.append(message, bool(self.consumers), numbered)
            return None
        entry = Entry(message, self, None, None, deliveries, dead=dead)
        self._entries[message.id] = entry
        self._fresh.append_entry(entry)
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
        Every message's entry, in no particular order (those of fresh
        messages made for the occasion).
        """
        return [
            *self._entries.values(),
            *(Entry(message, self) for message in self._fresh.messages()),
        ]

    def message_ids(self):
        """
        The C{(seq, messageId)} of every message in memory.
        """
        for message_id, entry in self._entries.items():
            yield entry.message.seq, message_id
        yield from self._fresh.ids()

    def held_after(self, after, limit):
        """
        The entries of the messages in memory published after sequence
        number C{after}, oldest first, at most C{limit}; and how many there
        are in all.
        """
        held = sorted(
            (e for e in self._entries.values() if e.message.seq > after),
            key=lambda e: e.message.seq,
        )
        fresh = self._fresh
        made = (Entry(message, self) for message in fresh.after(after))
        merged = heapq.merge(held, made, key=lambda e: e.message.seq)
        shown = list(itertools.islice(merged, limit))
        count = len(held) + fresh.count_after(after)
        return shown, count

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

    def take_in(self, message, deliveries=0, dead=None):
        """
        Hold a message that is neither ready nor in flight yet (claimed
        from a shared store, about to be sent or made ready).
        """
        entry = Entry(message, self, deliveries=deliveries, dead=dead)
        self._entries[message.id] = entry
        if message.expires is not None:
            self.expiring += 1
        return entry

    def make_ready(self, entry):
        """
        Make an entry from L{take_in} ready, at its place by publish order.
        """
        heapq.heappush(self._returned, (entry.message.seq, next(_order), entry))

    def _head(self):
        """
        Where the oldest ready message is: C{"returned"}, C{"fresh"} or
        L{None} (none, or none that may go before the tail on disk is read
        back), dropping removed entries from the heap on the way.
        """
        returned = self._returned
        while returned and returned[0][2].removed:
            heapq.heappop(returned)
        first = self._fresh.first()
        if returned and (first is None or returned[0][0] < seq_of(first)):
            if returned[0][0] > self.last_seq and self.spilled:
                # Moved here (a dead letter requeued) from past the messages
                # in memory: older ones may still be on disk, to be read
                # back and sent first.
                return None
            return "returned"
        if first is not None:
            return "fresh"
        return None

    def ready_head(self):
        """
        The oldest ready message's C{(seq, time, expires)}, left in place;
        or L{None}.
        """
        head = self._head()
        if head == "returned":
            message = self._returned[0][2].message
            return message.seq, message.time, message.expires
        if head == "fresh":
            return head_of(self._fresh.first())
        return None

    def peek_ready(self):
        """
        The oldest ready message's entry, left in place; or L{None}.
        """
        head = self._head()
        if head == "returned":
            return self._returned[0][2]
        if head == "fresh":
            first = self._fresh.peek()
            return first if first.__class__ is Entry else Entry(first, self)
        return None

    def pop_ready(self):
        """
        Take the oldest ready message, or return L{None} if there is none.

        The caller marks it in flight by setting its C{owner}.
        """
        fresh = self._fresh
        if self._returned:
            head = self._head()
            if head == "returned":
                return heapq.heappop(self._returned)[2]
            if head is None:
                return None
        else:
            items = fresh.items
            if not items:
                return None
            if len(items) == 1 and items[0].__class__ is Message:
                # Sent as soon as published (consumers keep up): never
                # packed.  Fresh.popleft, shortened.
                message = items[0]
                fresh.clear()
                entry = self._entries[message.id] = Entry(message, self)
                return entry
        message = fresh.popleft()
        if message is None or message.__class__ is Entry:
            # An entry read from a store has its place among the others.
            return message
        entry = self._entries[message.id] = Entry(message, self)
        return entry

    def get(self, message_id):
        """
        The entry of a message in this queue, or L{None}.
        """
        entry = self._entries.get(message_id)
        if entry is None:
            fresh = self._fresh
            index = fresh.find(message_id)
            if index >= 0:
                entry = Entry(fresh.message_at(index), self)
        return entry

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
        if entry is None:
            fresh = self._fresh
            index = fresh.find(message_id)
            if index < 0:
                return None
            entry = Entry(fresh.take(index), self)
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
        if not self._entries and not self._fresh.count:
            # Nothing left: drop the removed entries still waiting in the
            # ready structures.
            self._fresh.clear()
            self._returned.clear()
        return entry

    def purge(self):
        """
        Delete every message not in flight; return the removed entries.
        """
        removed = [
            self.remove(e.message.id)
            for e in list(self._entries.values())
            if e.owner is None
        ]
        fresh = [Entry(message, self) for message in self._fresh.messages()]
        self._fresh.clear()
        for entry in fresh:
            entry.removed = True
            if entry.message.expires is not None:
                self.expiring -= 1
        if not self._entries:
            self._returned.clear()
        return removed + fresh

    def clear(self):
        """
        Delete every message; return the removed entries.
        """
        entries = self.entries()
        for entry in entries:
            entry.removed = True
        self._entries.clear()
        self._fresh.clear()
        self._returned.clear()
        self.expiring = 0
        self.spilled = 0
        return entries
