"""
Tests for caps.codec: msgspec and the standard library give the broker the
same values, the same encodings and the same refusals.
"""

import json
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caps import codec

try:
    import msgspec
except ImportError:
    msgspec = None

# Each codec the broker can run with: (name, loads, dumps).
CODECS = [("stdlib", codec.stdlib_loads, codec.stdlib_dumps)]
if msgspec is not None:
    CODECS.append(("msgspec", *codec.with_msgspec(msgspec)))

REFUSED = [
    (b"{", "not valid JSON"),
    (b"\xff{}", "not valid UTF-8"),
    (b"NaN", "NaN is not valid JSON"),
    (b"[Infinity]", "Infinity is not valid JSON"),
    (b"1e400", "out of range"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'"\x00"', "not valid JSON"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),
]

DECODED = [
    (b' {"a": 1} ', {"a": 1}),
    (b'{"a":1,"a":2}', {"a": 2}),
    # Beyond 64 bits: every digit kept, not a float.
    (b"123456789012345678901234567890", 123456789012345678901234567890),
    (b"-9223372036854775809", -9223372036854775809),
    (b'{"id":"0000000000000000000000"}', {"id": "0000000000000000000000"}),
    # A lone surrogate is valid JSON text (not valid UTF-8 once decoded).
    (b'"\\ud800"', "\ud800"),
    (b'"\\u0000"', "\x00"),
    (b"1.5e308", 1.5e308),
    ('"caf\u00e9 \u2603"'.encode(), "caf\u00e9 \u2603"),
]

ENCODED = [
    ({"a": [1, 2.5, None, True]}, b'{"a":[1,2.5,null,true]}'),
    ("caf\u00e9", '"caf\u00e9"'.encode()),
    (2**70, b"1180591620717411303424"),
    ("\ud800", b'"\\ud800"'),
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


class CodecTests(SynchronousTestCase):
    def test_refused(self):
        """Every codec refuses the same lines, saying why."""
        for name, loads, _ in CODECS:
            for line, why in REFUSED:
                with self.assertRaises(codec.JSONError, msg=(name, line[:20])) as e:
                    loads(line)
                self.assertIn(why, str(e.exception), (name, line[:20]))

    def test_decoded(self):
        """Every codec decodes the edge cases to the same value and type."""
        for name, loads, _ in CODECS:
            for line, value in DECODED:
                got = loads(line)
                self.assertEqual(got, value, (name, line))
                self.assertIs(type(got), type(value), (name, line))

    def test_encoded(self):
        """Every codec encodes compact UTF-8, big integers and lone surrogates alike."""
        for name, _, dumps in CODECS:
            for value, encoded in ENCODED:
                self.assertEqual(dumps(value), encoded, (name, value))

    def test_depth_limit(self):
        """Nesting up to MAX_DEPTH is decoded and encoded again, one level more is refused, from any depth of the caller's stack."""

        def at_stack_depth(frames, loads, dumps, line):
            if frames:
                return at_stack_depth(frames - 1, loads, dumps, line)
            try:
                return dumps(loads(line))
            except codec.JSONError as e:
                return str(e)

        for name, loads, dumps in CODECS:
            for depth in (codec.MAX_DEPTH - 1, codec.MAX_DEPTH, codec.MAX_DEPTH + 1):
                line = b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
                answers = {
                    repr(at_stack_depth(frames, loads, dumps, line))
                    for frames in (0, 200, 400)
                }
                expected = (
                    line
                    if depth <= codec.MAX_DEPTH
                    else "the JSON is nested too deeply"
                )
                self.assertEqual(answers, {repr(expected)}, (name, depth))

    def test_too_deep_to_encode(self):
        """A value nested too deeply to encode is refused by every codec."""
        deep = []
        for _ in range(100_000):
            deep = [deep]
        for name, _, dumps in CODECS:
            with self.assertRaises(codec.JSONError, msg=name):
                dumps(deep)

    @settings(max_examples=300, deadline=None)
    @given(json_values)
    def test_same_values(self, value):
        """Whatever one codec encodes, every codec decodes to the same value."""
        for name, loads, dumps in CODECS:
            for _, other_loads, other_dumps in CODECS:
                self.assertEqual(other_loads(dumps(value)), loads(other_dumps(value)))
            self.assertEqual(loads(json.dumps(value).encode()), value, name)

    def test_environment_choice(self):
        """The broker uses msgspec when it is installed, and stdlib with CAPS_JSON=stdlib."""
        script = "from caps import codec; print(codec.NAME)"
        for setting, expected in [
            (None, "msgspec" if msgspec is not None else "stdlib"),
            ("stdlib", "stdlib"),
        ]:
            env = {k: v for k, v in os.environ.items() if k != "CAPS_JSON"}
            if setting is not None:
                env["CAPS_JSON"] = setting
            out = subprocess.run(
                [sys.executable, "-c", script],
                env=env,
                capture_output=True,
                check=True,
                timeout=60,
            )
            self.assertEqual(out.stdout.decode().strip(), expected)
