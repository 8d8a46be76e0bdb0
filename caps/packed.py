"""
A queue's fresh messages (never sent yet), packed: one bytes object per
message, in publish order, instead of a message object, an entry object
and a dictionary slot each.  Pure data structure, no I/O.

A record is a header (sequence number, time, expiry, the lengths of the
messageId and of the event) followed by the messageId, the event (left
out when it is the queue's own) and the payload.  Records are found by
messageId without a dictionary when the messageId ends in "-<sequence
number>" (as the broker makes them): the number is read back and the
record found by bisection.  Other messageIds are kept in a dictionary.
"""

import bisect
import math
import struct

from caps.message import Message

# seq, time, expires (NaN for none), messageId length, event length
_HEADER = struct.Struct("<qddHH")
_SIZE = _HEADER.size
_SEQ = struct.Struct("<q")
# Event length meaning "the queue's own event"
_OWN_EVENT = 0xFFFF
# Popped slots before the list is compacted, at least
_COMPACT = 1024


def pack(message, own_event):
    """
    The record of C{message} in a queue of event C{own_event}.
    """
    message_id = message.id.encode("utf-8")
    expires = message.expires
    if message.event == own_event:
        return b"".join(
            (
                _HEADER.pack(
                    message.seq,
                    message.time,
                    math.nan if expires is None else expires,
                    len(message_id),
                    _OWN_EVENT,
                ),
                message_id,
                message.payload,
            )
        )
    event = message.event.encode("utf-8")
    return b"".join(
        (
            _HEADER.pack(
                message.seq,
                message.time,
                math.nan if expires is None else expires,
                len(message_id),
                len(event),
            ),
            message_id,
            event,
            message.payload,
        )
    )


def unpack(record, own_event):
    """
    The L{Message} a record holds.
    """
    seq, time, expires, id_length, event_length = _HEADER.unpack_from(record)
    start = _SIZE + id_length
    message_id = record[_SIZE:start].decode("utf-8")
    if event_length == _OWN_EVENT:
        event = own_event
    else:
        event = record[start : start + event_length].decode("utf-8")
        start += event_length
    if expires != expires:
        expires = None
    return Message(message_id, event, record[start:], seq, time, expires)


def header(record):
    """
    A record's C{(seq, time, expires)}.
    """
    seq, time, expires, _, _ = _HEADER.unpack_from(record)
    return seq, time, None if expires != expires else expires


def seq_of(item):
    # A record, the sequence number left in place of a removed one, or an
    # entry.
    cls = item.__class__
    if cls is bytes:
        return _SEQ.unpack_from(item)[0]
    if cls is int:
        return item
    return item.message.seq


def _id_of(record):
    return record[_SIZE : _SIZE + _HEADER.unpack_from(record)[3]].decode("utf-8")


def _number(message_id):
    """
    The number after the last "-" of a messageId, or L{None}.
    """
    tail = message_id[message_id.rfind("-") + 1 :]
    if tail.isascii() and tail.isdigit() and (tail == "0" or tail[0] != "0"):
        return int(tail)
    return None


class Fresh:
    """
    Packed records in publish order, and among them the entries of
    messages read from a store that were sent before (those have an entry
    from the start; a removed one is skipped when it comes up).  What is
    taken from the front leaves L{None} behind (the list is compacted now
    and then); a record removed from the middle leaves its sequence
    number, so bisection still works.

    @ivar _items: records, sequence numbers of removed records, entries,
        and L{None}s before C{_head}.
    @ivar _head: where the first record not taken from the front is.
    @ivar _count: how many records it holds.
    @ivar _ids: messageId -> sequence number, for the records whose
        messageId does not end in "-<sequence number>".
    """

    __slots__ = ("_items", "_head", "_count", "_ids")

    def __init__(self):
        self._items = []
        self._head = 0
        self._count = 0
        self._ids = {}

    def __len__(self):
        """
        How many records it holds (entries not counted).
        """
        return self._count

    @property
    def slots(self):
        """
        How many records and entries it holds, removed ones still in the
        list counted.
        """
        return len(self._items) - self._head

    def append(self, message, own_event):
        """
        Add a message, published after every one it holds.
        """
        self._items.append(pack(message, own_event))
        self._count += 1
        message_id = message.id
        seq = message.seq
        if _number(message_id) != seq:
            self._ids[message_id] = seq

    def append_entry(self, entry):
        """
        Add the entry of a message published after every one it holds.
        """
        self._items.append(entry)

    def first(self):
        """
        The oldest record or entry not removed, left in place; or L{None}.
        """
        items = self._items
        head = self._head
        end = len(items)
        while head < end:
            item = items[head]
            cls = item.__class__
            if cls is bytes or (cls is not int and not item.removed):
                self._head = head
                return item
            items[head] = None
            head += 1
        self._head = head
        return None

    def popleft(self):
        """
        Take the oldest record or entry not removed, or return L{None} if
        there is none.
        """
        items = self._items
        head = self._head
        end = len(items)
        while head < end:
            item = items[head]
            items[head] = None
            head += 1
            cls = item.__class__
            if cls is bytes:
                self._taken(item)
            elif cls is int or item.removed:
                continue
            self._head = head
            if head >= _COMPACT and head * 2 >= end:
                del items[:head]
                self._head = 0
            return item
        self._head = head
        return None

    def _taken(self, record):
        self._count -= 1
        if self._ids:
            message_id = _id_of(record)
            if message_id in self._ids:
                del self._ids[message_id]

    def find(self, message_id):
        """
        Where the record of C{message_id} is, or -1.
        """
        seq = self._ids.get(message_id)
        if seq is None:
            seq = _number(message_id)
            if seq is None:
                return -1
        items = self._items
        index = bisect.bisect_left(items, seq, self._head, len(items), key=seq_of)
        if index < len(items):
            item = items[index]
            if item.__class__ is bytes and _id_of(item) == message_id:
                return index
        return -1

    def take(self, index):
        """
        Remove the record at C{index} (from L{find}) and return it.
        """
        items = self._items
        record = items[index]
        items[index] = _SEQ.unpack_from(record)[0]
        self._taken(record)
        return record

    def record(self, index):
        """
        The record at C{index} (from L{find}).
        """
        return self._items[index]

    def records(self):
        """
        Every record, oldest first.
        """
        items = self._items
        for index in range(self._head, len(items)):
            item = items[index]
            if item.__class__ is bytes:
                yield item

    def ids(self):
        """
        The C{(seq, messageId)} of every record, oldest first.
        """
        for record in self.records():
            yield _SEQ.unpack_from(record)[0], _id_of(record)

    def after(self, seq):
        """
        The records published after sequence number C{seq}, oldest first.
        """
        items = self._items
        start = bisect.bisect_right(items, seq, self._head, len(items), key=seq_of)
        for index in range(start, len(items)):
            item = items[index]
            if item.__class__ is bytes:
                yield item

    def clear(self):
        self._items = []
        self._head = 0
        self._count = 0
        self._ids.clear()
