"""
Tests for caps.fastframes: the fast path gives what caps.frames.parse_line
gives, for every line it takes.
"""

import json
import sys

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from caps import codec, fastframes, frames

# Names the tests make valid first (parse_line remembers valid names).
KNOWN = ["acme", "pickup", "driver-1", "x.dead", "order", "ok", "received"]
NAMES = st.sampled_from([*KNOWN, "unseen", "-bad", "", "a b", "é"])
ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
# A field's value: usually a plausible one, sometimes anything.
NAME_OR_ANY = NAMES | ANY_JSON


def _frame(draw_publish):
    fields = {
        "id": st.integers() | st.text(max_size=4) | ANY_JSON,
        "to": NAME_OR_ANY | st.lists(NAME_OR_ANY, max_size=3),
        "messageId": st.text(max_size=4) | st.just("x" * 129) | ANY_JSON,
        "ttl": st.integers(-1, 5)
        | st.floats(-1, 1e12, allow_nan=False)
        | st.just(frames.MAX_SECONDS + 1)
        | ANY_JSON,
    }
    if draw_publish:
        fields["payload"] = st.dictionaries(st.text(max_size=3), ANY_JSON) | ANY_JSON
        event = NAME_OR_ANY
    else:
        fields["payload"] = (
            st.fixed_dictionaries(
                {},
                optional={
                    "clientId": NAME_OR_ANY,
                    "event": NAME_OR_ANY,
                    "messageId": st.text(max_size=4) | ANY_JSON,
                },
            )
            | ANY_JSON
        )
        event = st.just("received")
    return st.fixed_dictionaries({"event": event}, optional=fields)


FRAMES = st.one_of(_frame(True), _frame(False))


def _line(frame, spaced):
    if spaced:
        return json.dumps(frame).encode("utf-8")
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


def _parse(line):
    """
    What caps.frames.parse_line gives: a result, or the error's class,
    message and request id.
    """
    try:
        return frames.parse_line(line)
    except frames.ProtocolError as e:
        return (type(e), e.message, e.request_id)


class FastFramesTests(SynchronousTestCase):
    def setUp(self):
        if codec.NAME != "msgspec":
            raise SkipTest("the fast path needs msgspec (CAPS_JSON=stdlib)")
        # A name is remembered once parse_line has seen it valid anywhere,
        # reserved event names too (as clientIds).
        frames.parse_line(json.dumps({"event": "e", "to": KNOWN}).encode())

    @settings(max_examples=500)
    @given(FRAMES, st.booleans())
    @example({"event": "order", "payload": {"a": 1}, "to": ["acme", "acme"]}, False)
    @example({"event": "received", "payload": {"clientId": ["x"]}}, False)
    @example({"event": "x.dead", "payload": {}}, False)
    @example({"event": "ok"}, False)
    @example({"event": "pickup", "ttl": 0}, False)
    @example({"event": "pickup", "messageId": "x" * 129}, False)
    @example(
        {
            "event": "received",
            "payload": {"clientId": "acme", "event": "ok", "messageId": "m"},
        },
        False,
    )
    def test_same_as_parse_line(self, frame, spaced):
        """Every line the fast path takes parses to the same request id and command."""
        line = _line(frame, spaced)
        fast = fastframes.fast(line)
        if fast is not None:
            self.assertEqual(fast, _parse(line))

    @given(st.binary(max_size=40))
    def test_any_bytes(self, line):
        """On any bytes, the fast path declines or agrees with parse_line."""
        fast = fastframes.fast(line)
        if fast is not None:
            self.assertEqual(fast, _parse(line))

    def test_duplicate_keys(self):
        """A field given twice counts once, the last time, as parse_line counts it."""
        line = b'{"event":"order","to":"acme","to":["driver-1"],"payload":{"a":1}}'
        self.assertEqual(fastframes.fast(line), frames.parse_line(line))
        self.assertEqual(fastframes.fast(line)[1].to, ("driver-1",))

    def test_acknowledgement_event_repeated(self):
        """An acknowledgement whose "event" is given again, as another event, is parsed as that event, as parse_line parses it."""
        line = (
            b'{"event":"received","payload":{"clientId":"acme","event":"order",'
            b'"messageId":"m"},"event":"order"}'
        )
        self.assertEqual(fastframes.parse_line(line), frames.parse_line(line))
        self.assertIsInstance(frames.parse_line(line)[1], frames.Publish)

    def test_acknowledgement_in_any_order(self):
        """An acknowledgement whose fields come in another order is parsed all the same."""
        line = (
            b'{"id":7,"payload":{"messageId":"m","event":"order","clientId":"acme"},'
            b'"event":"received"}'
        )
        self.assertEqual(
            fastframes.parse_line(line),
            (7, frames.Received("acme", "order", "m")),
        )

    def test_nested_deeply(self):
        """At every depth of nesting up to past the recursion limit, a publish and an acknowledgement parse as parse_line parses them."""
        for depth in range(sys.getrecursionlimit() + 10):
            nested = b"[" * depth + b"]" * depth
            for line in [
                b'{"event":"order","payload":{"x":' + nested + b"}}",
                b'{"event":"received","payload":{"clientId":"acme",'
                b'"event":"order","messageId":"m","x":' + nested + b"}}",
            ]:
                fast = fastframes.fast(line)
                if fast is not None:
                    self.assertEqual(fast, _parse(line))
                    self.assertLessEqual(depth, codec.MAX_DEPTH)

    def test_unknown_field_not_utf8(self):
        """A line with an unknown field that is not UTF-8 gets parse_line's bad-json error."""
        line = b'{"event":"order","pay\xe1oad":{}}'
        self.assertIsNone(fastframes.fast(line))
        self.assertRaises(frames.BadJSON, fastframes.parse_line, line)

    def test_takes_publish_and_acknowledgement(self):
        """A publish and an acknowledgement of names seen before take the fast path."""
        publish = (
            b'{"event":"pickup","id":7,"to":["acme","driver-1","acme"],'
            b'"messageId":"m-1","ttl":30,"payload":{"store":"acme","n":1}}'
        )
        received = (
            b'{"event":"received","payload":'
            b'{"clientId":"acme","event":"pickup","messageId":"m-1"}}'
        )
        self.assertEqual(
            fastframes.fast(publish),
            (
                7,
                frames.Publish(
                    "pickup",
                    {"store": "acme", "n": 1},
                    b'{"store":"acme","n":1}',
                    ("acme", "driver-1"),
                    "m-1",
                    30,
                ),
            ),
        )
        self.assertEqual(
            fastframes.fast(received),
            (None, frames.Received("acme", "pickup", "m-1")),
        )

    def test_leaves_errors_to_parse_line(self):
        """A frame with an error is left to parse_line, whose error the client gets."""
        for line in [
            b'{"event":"pickup","ttl":0}',
            b'{"event":"pickup","to":"-bad"}',
            b'{"event":"pickup","payload":[1]}',
            b'{"event":"pickup.dead"}',
            b'{"event":"ok"}',
            b'{"event":"received","payload":{"clientId":"acme","event":"pickup"}}',
            b'{"event":"pickup","id":true}',
            b'{"event":"pickup","messageId":"\\ud800"}',
            b"[1]",
            b"{",
        ]:
            self.assertIsNone(fastframes.fast(line), line)
            self.assertRaises(frames.ProtocolError, fastframes.parse_line, line)


class WithoutMsgspecTests(SynchronousTestCase):
    def test_stdlib(self):
        """With the standard library's codec, parse_line is caps.frames.parse_line."""
        if codec.NAME == "msgspec":
            raise SkipTest("msgspec is in use")
        self.assertIs(fastframes.parse_line, frames.parse_line)
