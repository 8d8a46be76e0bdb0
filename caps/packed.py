"""
A queue's fresh messages (never sent yet), packed: one bytes object per
message, in publish order, instead of a message object, an entry object
and a dictionary slot each.  Pure data structure, no I/O.

A record is a header (sequence number, time, expiry, the length of the
messageId) followed by the messageId, the event with its length (left
out when it is the queue's own) and the payload.  Records are found by
messageId without a dictionary when the messageId ends in "-<sequence
number>" (as the broker makes them): the number is read back and the
record found by bisection.  Other messageIds are kept in a dictionary.

The newest messages stay message objects until newer ones push them
out: up to L{UNPACKED} in a queue nobody consumes, L{UNPACKED_CONSUMED}
in one somebody does, which is likely to send them soon and would only
pay for packing and unpacking them.
"""

import bisect
import math
import struct

from caps.message import Message

# seq, time, expires (NaN for none), messageId length (its top bit set
# when the record holds an event of its own, its length after the
# messageId)
_HEADER = struct.Struct("<qddI")
_SIZE = _HEADER.size
_SEQ = struct.Struct("<q")
_LENGTH = struct.Struct("<I")
_OWN_EVENT_NOT = 0x80000000
# Popped slots before the list is compacted, at least
_COMPACT = 1024
# The newest items of a queue left unpacked, at most: without consumers,
# and with
UNPACKED = 64
UNPACKED_CONSUMED = 4096


def pack(message, own_event):
    """
    The record of C{message} in a queue of event C{own_event}.
    """
    message_id = message.id.encode("utf-8")
    expires = message.expires
    if expires is None:
        expires = math.nan
    if message.event == own_event:
        return b"".join(
            (
                _HEADER.pack(message.seq, message.time, expires, len(message_id)),
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
                expires,
                len(message_id) | _OWN_EVENT_NOT,
            ),
            message_id,
            _LENGTH.pack(len(event)),
            event,
            message.payload,
        )
    )


def unpack(record, own_event):
    """
    The L{Message} a record holds.
    """
    seq, time, expires, id_length = _HEADER.unpack_from(record)
    if expires != expires:
        expires = None
    if id_length & _OWN_EVENT_NOT:
        id_length &= ~_OWN_EVENT_NOT
        start = _SIZE + id_length
        (event_length,) = _LENGTH.unpack_from(record, start)
        start += _LENGTH.size
        event = record[start : start + event_length].decode("utf-8")
        payload = record[start + event_length :]
    else:
        start = _SIZE + id_length
        event = own_event
        payload = record[start:]
    message_id = record[_SIZE : _SIZE + id_length].decode("utf-8")
    return Message(message_id, event, payload, seq, time, expires)


def header(record):
    """
    A record's C{(seq, time, expires)}.
    """
    seq, time, expires, _ = _HEADER.unpack_from(record)
    return seq, time, None if expires != expires else expires


def seq_of(item):
    """
    The sequence number of an item of L{Fresh}: a record, a message, an
    entry, or the sequence number left in place of a removed record.
    """
    cls = item.__class__
    if cls is bytes:
        return _SEQ.unpack_from(item)[0]
    if cls is int:
        return item
    if cls is Message:
        return item.seq
    return item.message.seq


def head_of(item):
    """
    The C{(seq, time, expires)} of a record, a message or an entry.
    """
    if item.__class__ is bytes:
        return header(item)
    message = item if item.__class__ is Message else item.message
    return message.seq, message.time, message.expires


def _id_of(record):
    length = _HEADER.unpack_from(record)[3] & ~_OWN_EVENT_NOT
    return record[_SIZE : _SIZE + length].decode("utf-8")


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
    A queue's fresh messages in publish order: records, the newest
    messages unpacked, and among them the entries of messages read from a
    store that were sent before (those have an entry from the start; a
    removed one is skipped when it comes up).  What is taken from the
    front leaves L{None} behind (the list is compacted now and then); a
    message removed from the middle leaves its sequence number, so
    bisection still works.

    @ivar count: how many messages it holds, entries not counted.
    @ivar items: records, messages (the newest, from C{unpacked} on),
        sequence numbers of removed messages, entries, and L{None}s before
        C{head}.
    @ivar head: where the first item not taken from the front is.  Once
        every item is taken, C{items} is emptied (and C{head} and
        C{unpacked} are 0): a queue checks that before calling
        L{popleft}, on its hot path.
    @ivar unpacked: no message before this index is left unpacked; never
        less than C{head}, so that the newest messages left unpacked are
        counted from the first one not taken.
    @ivar _ids: messageId -> sequence number, for the messages whose
        messageId does not end in "-<sequence number>".
    @ivar _event: the queue's event, left out of records.
    """

    __slots__ = ("count", "items", "head", "unpacked", "_ids", "_event")

    def __init__(self, event):
        self.count = 0
        self.items = []
        self.head = 0
        self.unpacked = 0
        self._ids = {}
        self._event = event

    @property
    def slots(self):
        """
        How many messages and entries it holds, removed ones still in the
        list counted.
        """
        return len(self.items) - self.head

    def append(self, message, consumed=False, numbered=False):
        """
        Add a message, published after every one it holds, to a queue that
        has consumers (C{consumed}) or not; C{numbered} if its messageId is
        known to end in "-<its seq>".
        """
        items = self.items
        items.append(message)
        self.count += 1
        if not numbered:
            message_id = message.id
            if not message_id.endswith(f"-{message.seq}"):
                self._ids[message_id] = message.seq
        if len(items) - self.unpacked > (UNPACKED_CONSUMED if consumed else UNPACKED):
            self._pack_oldest()

    def _pack_oldest(self):
        """
        Pack the oldest message left unpacked.
        """
        items = self.items
        index = self.unpacked
        message = items[index]
        self.unpacked = index + 1
        if message.__class__ is Message:
            items[index] = pack(message, self._event)

    def append_entry(self, entry):
        """
        Add the entry of a message published after every one it holds.
        """
        items = self.items
        items.append(entry)
        if len(items) - self.unpacked > UNPACKED:
            self._pack_oldest()

    def first(self):
        """
        The oldest record, message or entry not removed, left in place;
        or L{None}.
        """
        items = self.items
        head = self.head
        end = len(items)
        while head < end:
            item = items[head]
            cls = item.__class__
            if cls is bytes or cls is Message or (cls is not int and not item.removed):
                self.head = head
                if self.unpacked < head:
                    self.unpacked = head
                return item
            items[head] = None
            head += 1
        # Nothing left: an empty list tells it at once.
        items.clear()
        self.head = self.unpacked = 0
        return None

    def peek(self):
        """
        The oldest message or entry not removed, left in place; or
        L{None}.
        """
        item = self.first()
        if item.__class__ is bytes:
            return unpack(item, self._event)
        return item

    def popleft(self):
        """
        Take the oldest message or entry not removed, or return L{None} if
        there is none.
        """
        items = self.items
        head = self.head
        end = len(items)
        while head < end:
            item = items[head]
            items[head] = None
            head += 1
            cls = item.__class__
            if cls is bytes or cls is Message:
                if cls is bytes:
                    item = unpack(item, self._event)
                self.count -= 1
                ids = self._ids
                if ids and item.id in ids:
                    del ids[item.id]
            elif cls is int or item.removed:
                continue
            if head == end:
                items.clear()
                self.unpacked = head = 0
            elif head >= _COMPACT and head * 2 >= end:
                del items[:head]
                self.unpacked = max(0, self.unpacked - head)
                head = 0
            elif self.unpacked < head:
                self.unpacked = head
            self.head = head
            return item
        items.clear()
        self.head = self.unpacked = 0
        return None

    def _taken(self, message_id):
        self.count -= 1
        ids = self._ids
        if ids and message_id in ids:
            del ids[message_id]

    def find(self, message_id):
        """
        Where the message C{message_id} is, or -1.
        """
        items = self.items
        seq = self._ids.get(message_id)
        if seq is None:
            seq = _number(message_id)
        if seq is not None and items and seq <= seq_of(items[-1]):
            # (A message newer than every one held, as each one read back
            # from a store is, is not looked for.)
            index = bisect.bisect_left(items, seq, self.head, len(items), key=seq_of)
            if index < len(items):
                item = items[index]
                cls = item.__class__
                if cls is bytes:
                    if _id_of(item) == message_id:
                        return index
                elif cls is Message and item.id == message_id:
                    return index
        return -1

    def message_at(self, index):
        """
        The message at C{index} (from L{find}).
        """
        item = self.items[index]
        if item.__class__ is bytes:
            return unpack(item, self._event)
        return item

    def take(self, index):
        """
        Remove the message at C{index} (from L{find}) and return it.
        """
        message = self.message_at(index)
        self.items[index] = message.seq
        self._taken(message.id)
        return message

    def messages(self, start=None):
        """
        Every message (entries left out), oldest first; from index
        C{start} on, if given.
        """
        items = self.items
        event = self._event
        for index in range(self.head if start is None else start, len(items)):
            item = items[index]
            cls = item.__class__
            if cls is bytes:
                yield unpack(item, event)
            elif cls is Message:
                yield item

    def ids(self):
        """
        The C{(seq, messageId)} of every message, oldest first.
        """
        items = self.items
        for index in range(self.head, len(items)):
            item = items[index]
            cls = item.__class__
            if cls is bytes:
                yield _SEQ.unpack_from(item)[0], _id_of(item)
            elif cls is Message:
                yield item.seq, item.id

    def after(self, seq):
        """
        The messages published after sequence number C{seq}, oldest first.
        """
        items = self.items
        start = bisect.bisect_right(items, seq, self.head, len(items), key=seq_of)
        return self.messages(start)

    def count_after(self, seq):
        """
        How many messages were published after sequence number C{seq}.
        """
        items = self.items
        start = bisect.bisect_right(items, seq, self.head, len(items), key=seq_of)
        return sum(
            1
            for index in range(start, len(items))
            if items[index].__class__ in (bytes, Message)
        )

    def clear(self):
        self.count = 0
        self.items.clear()
        self.head = self.unpacked = 0
        self._ids.clear()
