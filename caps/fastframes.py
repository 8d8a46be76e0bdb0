"""
The fast path of L{caps.frames.parse_line}, for the two frames of nearly
every message: a publish, and its acknowledgement (C{received}).

msgspec decodes such a line straight into typed structures, checking the
types of its fields in C, so that only the checks a type cannot say are
left to Python.  The fast path takes a line only when it is plainly valid
(its names already seen valid, its numbers in range); anything else,
including anything msgspec refuses, goes to L{caps.frames.parse_line},
whose answer or error stands.  So the two give the same result for every
line the fast path takes (tests/test_fastframes.py checks that on random
lines), and every error a client can get is still made in one place.

Without msgspec (or with C{CAPS_JSON=stdlib}), L{parse_line} is
L{caps.frames.parse_line} itself.
"""

from caps import codec, frames

_VALID = frames.VALID_NAMES
_RESERVED = frames.RESERVED_EVENTS
_Publish = frames.Publish
_Received = frames.Received
_MAX_MESSAGE_ID = frames.MAX_MESSAGE_ID
_MAX_SECONDS = frames.MAX_SECONDS
_parse_line = frames.parse_line
_encode = codec.dumps
_MAX_DEPTH = codec.MAX_DEPTH


def _typed_parser(msgspec):
    """
    C{parse_line} with msgspec's typed decoding first.
    """

    # Unknown fields are refused, not skipped: msgspec skips a value
    # without checking its UTF-8, which parse_line refuses.
    class Frame(msgspec.Struct, forbid_unknown_fields=True):
        event: str
        id: int | str | None = None
        payload: dict | None = None
        to: str | list[str] | None = None
        messageId: str | None = None
        ttl: int | float | None = None

    # An acknowledgement as clients write it, event first, decoded with
    # its payload's fields typed too.
    class Acknowledged(msgspec.Struct, forbid_unknown_fields=True):
        clientId: str
        event: str
        messageId: str

    class Acknowledgement(msgspec.Struct, forbid_unknown_fields=True):
        event: str
        payload: Acknowledged
        id: int | str | None = None

    # msgspec refuses a lone surrogate, so every string it gives can be
    # written as UTF-8 (parse_line checks messageIds for that).
    refused = (msgspec.DecodeError, ValueError, RecursionError)
    decode_frame = msgspec.json.Decoder(Frame).decode
    decode_acknowledgement = msgspec.json.Decoder(Acknowledgement).decode

    def fast(line):
        # Nested more than codec.MAX_DEPTH deep needs more brackets than
        # that (left to parse_line, which says so).
        if len(line) > _MAX_DEPTH and (
            line.count(b"[") + line.count(b"{") > _MAX_DEPTH
        ):
            return None
        if line.startswith(b'{"event":"received",'):
            try:
                frame = decode_acknowledgement(line)
            except refused:
                return None
            acknowledged = frame.payload
            queue_event = acknowledged.event
            # (A repeated "event" key may have changed the frame's event.)
            if (
                frame.event == "received"
                and acknowledged.clientId in _VALID
                and queue_event in _VALID
                and queue_event not in _RESERVED
            ):
                return frame.id, _Received(
                    acknowledged.clientId, queue_event, acknowledged.messageId
                )
            return None
        try:
            frame = decode_frame(line)
        except refused:
            return None
        event = frame.event
        payload = frame.payload
        if event == "received":
            # Written in another order: left to parse_line.
            return None
        if event not in _VALID or event in _RESERVED or event.endswith(".dead"):
            return None
        if payload is None:
            payload = {}
        to = frame.to
        if to is None:
            to = ()
        elif type(to) is str:
            if to not in _VALID:
                return None
            to = (to,)
        else:
            for client_id in to:
                if client_id not in _VALID:
                    return None
            to = tuple(dict.fromkeys(to))
        message_id = frame.messageId
        if message_id is not None and not 0 < len(message_id) <= _MAX_MESSAGE_ID:
            return None
        ttl = frame.ttl
        if ttl is not None and not 0 < ttl <= _MAX_SECONDS:
            return None
        try:
            body = _encode(payload)
        except codec.JSONError:
            return None
        return frame.id, _Publish(event, payload, body, to, message_id, ttl)

    def parse_line(line):
        """
        Parse one line (without its line ending) sent by a client: as
        L{caps.frames.parse_line}, faster for a publish or an
        acknowledgement.
        """
        parsed = fast(line)
        if parsed is None:
            return _parse_line(line)
        return parsed

    return fast, parse_line


def _pick():
    if codec.NAME == "msgspec":
        import msgspec

        return _typed_parser(msgspec)
    return (lambda line: None), _parse_line


#: C{fast(line)}: the fast path alone: C{(request_id, command)}, or L{None}
#: for a line it leaves to L{caps.frames.parse_line}.
#: C{parse_line(line)}: what L{caps.frames.parse_line} gives, faster.
fast, parse_line = _pick()
