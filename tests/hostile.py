"""
Hostile input for the broker's protocol, as hypothesis strategies, for
tests/test_fuzz.py: arbitrary bytes and JSON, valid frames of every kind
(docs/protocol.md, sections 5 and 6), the same with one field made wrong,
and 1 MiB lines.

None of them can name a victim's queue ("victim-<random hex>"): the names
they draw come from a small alphabet without "v" or from fixed lists,
their free text has no "v", arbitrary bytes have theirs replaced, and a
victim's names end in 64 random bits.
"""

import itertools
import json

from hypothesis import strategies as st

from caps.frames import RESERVED_EVENTS

MIB = 1024 * 1024

NAMES = st.text(alphabet="abxy01", min_size=1, max_size=2)
# Lone surrogates too, which JSON can carry as \ud800 but UTF-8 cannot.
TEXT = st.text(
    st.one_of(
        st.characters(exclude_characters="vV"),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    ),
    max_size=12,
)
FIELDS = st.sampled_from(
    [
        "event",
        "id",
        "payload",
        "to",
        "messageId",
        "ttl",
        "clientId",
        "filter",
        "prefetch",
        "ackTimeout",
        "maxLength",
        "delete",
        "delay",
    ]
)
EVENTS = st.one_of(NAMES, st.sampled_from(sorted(RESERVED_EVENTS)), TEXT)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
    | NAMES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(FIELDS | TEXT, kids, max_size=4)
    ),
    max_leaves=12,
)
SMALL_PAYLOADS = st.dictionaries(
    st.sampled_from(["n", "store", "x"]), st.integers(0, 2) | NAMES, max_size=2
)
MESSAGE_IDS = st.sampled_from(["m0", "m1", "m2"])
CONTROL = ["subscribe", "unsubscribe", "getAll", "getall", "received", "nack"]
CONTROL += ["requeue", "ping"]


def deep(n, open_=b"[", close=b"]", inner=b"1"):
    return open_ * n + inner + close * n


# Raw JSON texts a field is replaced with.  Deep nesting stays away from
# the depth at which a value just parses (see tests/test_fuzz.py, FuzzFindingsTests).
BAD_VALUES = [
    # wrong types
    *(b"true", b"false", b"null", b"0", b"-1", b"1", b'""', b'"x"', b'"1"'),
    *(b"[]", b"{}", b"[1]", b'{"a":1}', b'["a","b"]'),
    # integers beyond 64 bits, and of 4300, 4301 and 5000 digits
    *(b"18446744073709551616", b"-9223372036854775809", b"1" + b"0" * 30),
    *(b"9" * 4300, b"1" + b"0" * 4300, b"1" + b"0" * 4999, b"-" + b"7" * 5000),
    # floats
    *(b"1.5", b"0.0", b"-0.0", b"1e3", b"5e-324", b"1e308", b"1e999", b"-1e999"),
    *(b"1.7976931348623157e308", b"0.1", b"2.5e-10"),
    # NaN and its friends, which strict JSON has not
    *(b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"nan", b"inf"),
    # deep nesting
    *(deep(10), deep(100), deep(500), deep(5000), deep(50_000)),
    *(deep(100, b'{"a":', b"}"), deep(5000, b'{"a":', b"}")),
    # invalid UTF-8: a stray byte, a truncated sequence, an encoded
    # surrogate, past U+10FFFF, an overlong "/"
    *(b'"\xff"', b'"\xc3"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xc0\xaf"'),
    *(b'"a\x80b"', b"\xff"),
    # lone surrogates as escapes (and one valid pair)
    *(b'"\\ud800"', b'"\\udfff"', b'"a\\udbffb"', b'"\\udc00\\ud800"'),
    *(b'"\\ud83d\\ude00"', b'["\\ud800"]', b'{"\\ud800":1}', b'"\\ud800.dead"'),
    # NUL bytes: raw (not JSON) and escaped
    *(b'"\x00"', b'"\\u0000"', b'"a\\u0000b"', b"\x00", b'"\\u0000.dead"'),
    # long strings: names of 64, 65 and 69 characters, messageIds of 128
    # and 129, and 1 KiB, 60 KiB and 70 KiB (a line over the limit)
    *(b'"' + b"a" * n + b'"' for n in (64, 65, 69, 70, 128, 129, 1024)),
    *(b'"' + b"a" * n + b'"' for n in (60_000, 70_000)),
    b'"' + "\u00e9".encode() * 100 + b'"',
    # names that break the rule, or are reserved
    *(b'"a b"', b'"-a"', b'".dead"', b'"a.dead"', b'"ok"', b'"ping"', b'"login"'),
    *(b'"a\\nb"', b'"\\u00e9"'),
    # not a value at all
    *(b"", b"}", b'"unterminated', b",", b"1 2", b"\r"),
]
BAD_VALUE = st.one_of(
    st.sampled_from(BAD_VALUES),
    st.integers().map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
)
PLACEHOLDER = "@@mutant@@"


def padded(prefix, suffix=b""):
    return prefix + b"y" * (MIB - len(prefix) - len(suffix)) + suffix


MEBIBYTE_LINES = {
    "ping": padded(b'{"event":"ping","id":1,"payload":{"x":"', b'"}}'),
    "publish": padded(b'{"event":"e","id":1,"to":"a","payload":{"x":"', b'"}}'),
    "garbage": padded(b"{"),
    "utf8": padded(b'{"event":"ping","id":1,"payload":{"x":"\xff', b'"}}'),
    "deep": b"[" * MIB,
    "blank": b" " * MIB,
}


@st.composite
def valid_frames(draw):
    """
    A valid frame (docs/protocol.md, sections 5 and 6) on the fuzzer's own
    names, without an id.
    """
    kind = draw(st.sampled_from([*CONTROL, "publish", "publish"]))
    payload = {"clientId": draw(NAMES), "event": draw(NAMES)}
    optional = {}
    if kind == "subscribe":
        optional = {
            "filter": SMALL_PAYLOADS,
            "prefetch": st.integers(1, 3),
            "ackTimeout": st.integers(0, 60) | st.floats(0, 60),
            "maxLength": st.integers(1, 4),
        }
    elif kind == "unsubscribe":
        optional = {"delete": st.booleans()}
    elif kind in ("received", "nack"):
        payload["messageId"] = draw(MESSAGE_IDS)
        if kind == "nack":
            optional = {"delay": st.integers(0, 5) | st.floats(0, 5)}
    elif kind == "requeue":
        optional = {"messageId": MESSAGE_IDS}
    elif kind == "ping":
        payload = draw(SMALL_PAYLOADS)
    elif kind == "publish":
        frame = {"event": draw(NAMES), "payload": draw(SMALL_PAYLOADS)}
        optional = {
            "to": NAMES | st.lists(NAMES, max_size=3),
            "messageId": MESSAGE_IDS,
            "ttl": st.integers(1, 60) | st.floats(0.5, 60),
        }
        frame.update(draw(st.fixed_dictionaries({}, optional=optional)))
        return frame
    payload.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return {"event": kind, "payload": payload}


# Fields a mutation may replace, remove or add, besides those present.
MUTABLE = [("event",), ("id",), ("payload",), ("to",), ("messageId",), ("ttl",)]
MUTABLE += [
    ("payload", key)
    for key in "clientId event filter prefetch ackTimeout maxLength".split()
    + "delete messageId delay".split()
]


@st.composite
def near_valid_frames(draw, request_id):
    """
    The line of a valid frame with one field replaced by a bad value, or
    removed.
    """
    frame = draw(valid_frames())
    frame["id"] = request_id
    present = [(key,) for key in frame]
    if isinstance(frame.get("payload"), dict):
        present += [("payload", key) for key in frame["payload"]]
    path = draw(st.sampled_from(present + MUTABLE))
    parent = frame
    if len(path) == 2:
        if not isinstance(frame.get("payload"), dict):
            frame["payload"] = {}
        parent = frame["payload"]
    if draw(st.integers(0, 9)) == 0:
        parent.pop(path[-1], None)
        return json.dumps(frame).encode()
    parent[path[-1]] = PLACEHOLDER
    line = json.dumps(frame).encode()
    return line.replace(json.dumps(PLACEHOLDER).encode(), draw(BAD_VALUE), 1)


def json_line(value, ascii_only):
    # A lone surrogate in a str becomes invalid UTF-8 (CESU), on purpose.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


JSON_FRAMES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries(
        {"event": EVENTS},
        optional={
            "id": JSON_VALUES,
            "payload": JSON_VALUES
            | st.fixed_dictionaries(
                {},
                optional={
                    "clientId": NAMES | JSON_VALUES,
                    "event": EVENTS | JSON_VALUES,
                    "messageId": TEXT | JSON_VALUES,
                    "filter": JSON_VALUES,
                },
            ),
            "to": NAMES | st.lists(NAMES) | JSON_VALUES,
            "messageId": TEXT | JSON_VALUES,
            "ttl": JSON_VALUES,
        },
    ),
)
# Bytes with some structure, so that some of it gets past the JSON parser.
TOKENS = st.sampled_from(
    [b"\n", b"\r\n", b"\r", b" ", b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\"]
    + [b'"event"', b'"payload"', b'"id"', b'"ping"', b'"to"', b'"a"', b"1", b"-"]
    + [b"\\ud800", b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"null", b"true"]
)
BYTES = st.lists(
    st.one_of(
        st.binary(max_size=64).map(lambda b: b.replace(b"v", b"w").replace(b"V", b"W")),
        TOKENS,
    ),
    max_size=40,
).map(b"".join)


def chunks(data, cuts):
    """
    C{data} cut at the offsets C{cuts} (taken modulo its length).
    """
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]
