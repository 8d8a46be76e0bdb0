"""
Frames: the wire format of the CAPS protocol, with no Twisted and no I/O.

One JSON object per line.  L{parse_line} turns a client's line into a
request id and a typed command, or raises L{FrameError} with a stable wire
code; the encoders turn the broker's answers back into lines.
"""

import re

import attrs

from caps import codec

# Names of events and clientIds.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")

CONTROL_EVENTS = frozenset(
    {
        "subscribe",
        "unsubscribe",
        "getAll",
        "getall",
        "received",
        "nack",
        "requeue",
        "ping",
        "login",
    }
)
RESERVED_EVENTS = CONTROL_EVENTS | frozenset(
    {
        "ok",
        "error",
        "pong",
        "logout",
        "hello",
        "join",
        "stats",
    }
)

MAX_MESSAGE_ID = 128
# How deeply a subscription filter's values may be nested.
MAX_FILTER_DEPTH = 32
MAX_PASSWORD = 1024
# A queue's dead letters are (clientId, event + DEAD_SUFFIX).
DEAD_SUFFIX = ".dead"
# Upper bounds for numbers in frames: beyond them a value is a mistake.
MAX_PREFETCH = 1_000_000
MAX_SECONDS = 10 * 365 * 24 * 3600


class ProtocolError(Exception):
    """
    A request the broker refuses, with a stable wire C{code}.

    @ivar request_id: the client's C{id} for the frame, if it could be read.
    """

    code = "bad-frame"

    def __init__(self, message, request_id=None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class BadJSON(ProtocolError):
    code = "bad-json"


class BadFrame(ProtocolError):
    code = "bad-frame"


class BadName(ProtocolError):
    code = "bad-name"


class ReservedEvent(ProtocolError):
    code = "reserved-event"


# The commands a line parses to.  Values, but not frozen attrs classes: a
# frozen class takes four times as long to build, one is built for every
# line, and nothing changes them once built.


@attrs.define
class Subscribe:
    client_id: str
    event: str
    filter: dict | None = None
    prefetch: int | None = None
    ack_timeout: float | None = None
    max_length: int | None = None


@attrs.define
class Unsubscribe:
    client_id: str
    event: str
    delete: bool = False


@attrs.define
class GetAll:
    client_id: str
    event: str


@attrs.define
class Received:
    client_id: str
    event: str
    message_id: str


@attrs.define
class Nack:
    client_id: str
    event: str
    message_id: str
    delay: float = 0


@attrs.define
class Requeue:
    client_id: str
    event: str
    message_id: str | None = None


@attrs.define
class Login:
    client_id: str
    password: str = attrs.field(repr=False)


@attrs.define
class Ping:
    payload: dict


@attrs.define
class Publish:
    """
    A message to route.

    @ivar payload: the decoded payload, for routing by filter.
    @ivar body: the payload encoded as compact JSON bytes: encoded once here
        and written as is in every delivery.
    @ivar to: the clientIds it is addressed to, without repeats, in order.
    """

    event: str
    payload: dict
    body: bytes
    to: tuple = ()
    message_id: str | None = None
    ttl: float | None = None


def decode_json(line):
    """
    Decode one line of UTF-8 JSON text, or raise L{BadJSON}.
    """
    try:
        return codec.loads(line)
    except codec.JSONError as e:
        raise BadJSON(str(e)) from None


def encode_json(value):
    """
    Encode a JSON value as compact UTF-8 bytes (see L{caps.codec}), or raise
    L{BadJSON} if it is nested too deeply.
    """
    try:
        return codec.dumps(value)
    except codec.JSONError as e:
        raise BadJSON(str(e)) from None


def _field(obj, key, kind, where, request_id, required=True):
    value = obj.get(key)
    if type(value) is kind:
        return value
    if value is None:
        if required:
            raise BadFrame(f"missing field {where}{key}", request_id)
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadFrame(f"field {where}{key} must be {_KIND_NAMES[kind]}", request_id)
    return value


_KIND_NAMES = {
    str: "a string",
    dict: "an object",
    bool: "true or false",
}


# Names seen valid already (a bounded cache, cleared when full): most
# frames name the same few clients and events, and a set look-up costs a
# fifth of the regular expression.  caps.fastframes reads it too.
VALID_NAMES = set()
VALID_NAMES_MAX = 10_000


def _name(value, field, request_id):
    if value in VALID_NAMES:
        return value
    if not NAME.match(value):
        raise BadName(
            f"{field} {value!r} is not a valid name "
            "(1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit)",
            request_id,
        )
    if len(VALID_NAMES) >= VALID_NAMES_MAX:
        VALID_NAMES.clear()
    VALID_NAMES.add(value)
    return value


def _number(obj, key, where, request_id, low, high, integer=False, low_open=False):
    """
    An optional number field within bounds, or L{None}.
    """
    value = obj.get(key)
    if value is None:
        return None
    kinds = int if integer else (int, float)
    what = "a whole number" if integer else "a number"
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise BadFrame(f"field {where}{key} must be {what}", request_id)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bound = f"more than {low}" if low_open else f"at least {low}"
        raise BadFrame(
            f"field {where}{key} must be {what}, {bound} and at most {high}",
            request_id,
        )
    return value


def _queue_fields(payload, request_id, dead_letters=True):
    """
    The (clientId, event) a control frame names; with C{dead_letters}, the
    event may be a queue's dead letters (C{pickup.dead}).
    """
    client_id = _field(payload, "clientId", str, "payload.", request_id)
    event = _field(payload, "event", str, "payload.", request_id)
    _name(client_id, "payload.clientId", request_id)
    if dead_letters and event.endswith(DEAD_SUFFIX) and NAME.match(event[:-5]):
        return client_id, event
    _name(event, "payload.event", request_id)
    if event in RESERVED_EVENTS:
        raise ReservedEvent(
            f"payload.event {event!r} is reserved for the protocol", request_id
        )
    return client_id, event


def _subscribe(frame, payload, request_id):
    client_id, event = _queue_fields(payload, request_id)
    flt = _field(payload, "filter", dict, "payload.", request_id, required=False)
    if flt and codec.depth(flt) > MAX_FILTER_DEPTH:
        raise BadFrame(
            f"field payload.filter may be nested at most {MAX_FILTER_DEPTH} deep",
            request_id,
        )
    where = ("payload.", request_id)
    return Subscribe(
        client_id,
        event,
        flt or None,
        prefetch=_number(payload, "prefetch", *where, 1, MAX_PREFETCH, integer=True),
        ack_timeout=_number(payload, "ackTimeout", *where, 0, MAX_SECONDS),
        max_length=_number(
            payload, "maxLength", *where, 1, MAX_PREFETCH * 1000, integer=True
        ),
    )


def _unsubscribe(frame, payload, request_id):
    client_id, event = _queue_fields(payload, request_id)
    delete = _field(payload, "delete", bool, "payload.", request_id, required=False)
    return Unsubscribe(client_id, event, bool(delete))


def _get_all(frame, payload, request_id):
    return GetAll(*_queue_fields(payload, request_id))


def _message_id(obj, where, request_id, required=True):
    """
    A messageId field: a string that UTF-8 can hold (no lone surrogate:
    the store could not write it).
    """
    message_id = _field(obj, "messageId", str, where, request_id, required)
    if message_id is not None and not message_id.isascii():
        try:
            message_id.encode("utf-8")
        except UnicodeEncodeError:
            raise BadFrame(
                f"field {where}messageId must be text (it holds a lone surrogate)",
                request_id,
            ) from None
    return message_id


def _received(frame, payload, request_id):
    client_id, event = _queue_fields(payload, request_id)
    message_id = _message_id(payload, "payload.", request_id)
    return Received(client_id, event, message_id)


def _nack(frame, payload, request_id):
    client_id, event = _queue_fields(payload, request_id)
    message_id = _message_id(payload, "payload.", request_id)
    delay = _number(payload, "delay", "payload.", request_id, 0, MAX_SECONDS)
    return Nack(client_id, event, message_id, delay or 0)


def _requeue(frame, payload, request_id):
    client_id, event = _queue_fields(payload, request_id, dead_letters=False)
    message_id = _message_id(payload, "payload.", request_id, required=False)
    return Requeue(client_id, event, message_id)


def _ping(frame, payload, request_id):
    return Ping(payload)


def _login(frame, payload, request_id):
    client_id = _field(payload, "clientId", str, "payload.", request_id)
    _name(client_id, "payload.clientId", request_id)
    password = _field(payload, "password", str, "payload.", request_id)
    if not 1 <= len(password) <= MAX_PASSWORD:
        raise BadFrame(
            f"field payload.password must be 1 to {MAX_PASSWORD} characters",
            request_id,
        )
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise BadFrame(
            "field payload.password must be text (it holds a lone surrogate)",
            request_id,
        ) from None
    return Login(client_id, password)


_CONTROL = {
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "getAll": _get_all,
    "getall": _get_all,
    "received": _received,
    "nack": _nack,
    "requeue": _requeue,
    "ping": _ping,
    "login": _login,
}


def _publish(frame, event, payload, request_id):
    _name(event, "event", request_id)
    if event.endswith(DEAD_SUFFIX):
        raise ReservedEvent(
            f"event {event!r}: names ending in {DEAD_SUFFIX} are dead letters",
            request_id,
        )
    to = frame.get("to")
    if to is None:
        to = ()
    elif type(to) is str:
        to = (_name(to, "to", request_id),)
    elif isinstance(to, list) and all(isinstance(c, str) for c in to):
        to = tuple(dict.fromkeys(_name(c, "to", request_id) for c in to))
    else:
        raise BadFrame("field to must be a clientId or a list of them", request_id)
    message_id = _message_id(frame, "", request_id, required=False)
    if message_id is not None and not 1 <= len(message_id) <= MAX_MESSAGE_ID:
        raise BadFrame(
            f"field messageId must be 1 to {MAX_MESSAGE_ID} characters", request_id
        )
    ttl = _number(frame, "ttl", "", request_id, 0, MAX_SECONDS, low_open=True)
    try:
        body = encode_json(payload)
    except BadJSON as e:
        e.request_id = request_id
        raise
    return Publish(event, payload, body, to, message_id, ttl)


# Exact types: True and False are ints too, and not ids.
_ID_TYPES = frozenset({int, str})


def parse_line(line):
    """
    Parse one line (without its line ending) sent by a client.

    @return: C{(request_id, command)}, where C{request_id} is the frame's
        C{id} or L{None} and C{command} is one of the command classes above.
    @raise ProtocolError: for anything that is not a valid frame.
    """
    frame = decode_json(line)
    if not isinstance(frame, dict):
        raise BadFrame("a frame must be a JSON object")
    request_id = frame.get("id")
    if request_id is not None and type(request_id) not in _ID_TYPES:
        raise BadFrame("field id must be a string or an integer")
    event = _field(frame, "event", str, "", request_id)
    payload = frame.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise BadFrame("field payload must be an object", request_id)
    control = _CONTROL.get(event)
    if control is not None:
        return request_id, control(frame, payload, request_id)
    if event in RESERVED_EVENTS:
        raise ReservedEvent(f"event {event!r} is reserved for the protocol", request_id)
    return request_id, _publish(frame, event, payload, request_id)


def reply(event, payload, request_id=None):
    """
    Encode a broker reply (C{ok}, C{error}, C{pong}) as a line.
    """
    frame = {"event": event, "payload": payload}
    if request_id is not None:
        frame["id"] = request_id
    return encode_json(frame) + b"\n"


def error(code, message, request_id=None):
    """
    Encode an C{error} frame as a line.
    """
    return reply("error", {"code": code, "message": message}, request_id)
