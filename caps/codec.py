"""
The JSON codec: msgspec where it is installed, the standard library's json
otherwise, with the same results either way.

msgspec decodes and encodes a 200-byte order about 5 times faster than the
standard library, and JSON was a third of the broker's CPU per message.
(orjson is as fast, but turns integers beyond 64 bits into imprecise
floats; msgspec keeps every digit, as the standard library does.)  The two
differ at the edges, so whatever msgspec refuses goes to the standard
library, whose answer stands:

  - a line msgspec refuses (invalid UTF-8, NaN, nesting too deep, a lone
    surrogate, ...) is decoded again by the standard library, whose error
    (or, for a lone surrogate, whose value) is the answer;
  - a value msgspec cannot encode (a string with a lone surrogate, nesting
    too deep) is encoded by the standard library.

Set C{CAPS_JSON=stdlib} in the environment to use the standard library
only.
"""

import json
import math
import os
import sys


class JSONError(ValueError):
    """
    A line that is not JSON the broker accepts; the message says why.
    """


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is out of range")
    return value


# NaN, Infinity and numbers too large for a double would come out as
# NaN/Infinity, which is not JSON: refuse them coming in.
_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ascii = json.JSONEncoder(separators=(",", ":"))


#: Arrays and objects nested deeper than this are refused.  A decoder runs
#: out of stack somewhere near 1,000 levels, depending on how deep its
#: caller is; a fixed limit well below makes the answer the same from any
#: caller, and leaves room to encode whatever was decoded.
MAX_DEPTH = 512
_TOO_DEEP = "the JSON is nested too deeply"


def depth(value):
    """
    How deeply a JSON value is nested (a scalar is 0), without recursion.
    """
    deepest = 0
    stack = [(value, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((item, level) for item in value)
    return deepest


def _check_depth(line, value):
    """
    Raise L{JSONError} if C{value}, decoded from C{line}, is nested deeper
    than L{MAX_DEPTH}; a line with fewer brackets cannot be.
    """
    if (
        len(line) > MAX_DEPTH
        and line.count(b"[") + line.count(b"{") > MAX_DEPTH
        and depth(value) > MAX_DEPTH
    ):
        raise JSONError(_TOO_DEEP)
    return value


def stdlib_loads(line):
    """
    Decode one line of UTF-8 JSON text with the standard library.

    @raise JSONError: if it is not valid JSON.
    """
    try:
        value = _decoder.decode(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise JSONError("the line is not valid UTF-8") from None
    except RecursionError:
        raise JSONError(_TOO_DEEP) from None
    except ValueError as e:
        # JSONDecodeError, NaN/Infinity, or an integer too long to convert
        # (whose message tells how to raise Python's limit: not for
        # clients).
        if "int_max_str_digits" in str(e):
            raise JSONError(
                "the line is not valid JSON: an integer of more than "
                f"{sys.get_int_max_str_digits()} digits"
            ) from None
        raise JSONError(f"the line is not valid JSON: {e}") from None
    return _check_depth(line, value)


def stdlib_dumps(value):
    """
    Encode a JSON value as compact UTF-8 bytes with the standard library.

    Non-ASCII text is kept as is, for people reading with netcat; a string
    with a lone surrogate (which JSON escapes can carry but UTF-8 cannot) is
    written with ASCII escapes instead.

    @raise JSONError: if it is nested too deeply to encode.
    """
    try:
        return _compact.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return _ascii.encode(value).encode("ascii")
    except RecursionError:
        # Decoding takes a little less stack than encoding: a value nested
        # just shallowly enough to decode can still be too deep here.
        raise JSONError("the JSON is nested too deeply") from None


def with_msgspec(msgspec):
    """
    The C{(loads, dumps)} pair that uses C{msgspec} and falls back on the
    standard library for whatever msgspec refuses.
    """
    fast_loads = msgspec.json.Decoder().decode
    fast_dumps = msgspec.json.Encoder().encode
    refused = (msgspec.DecodeError, ValueError, RecursionError)

    def loads(line):
        try:
            value = fast_loads(line)
        except refused:
            return stdlib_loads(line)
        return _check_depth(line, value)

    def dumps(value):
        try:
            return fast_dumps(value)
        except (TypeError, ValueError, RecursionError):
            return stdlib_dumps(value)

    return loads, dumps


def _pick():
    if os.environ.get("CAPS_JSON") != "stdlib":
        try:
            import msgspec
        except ImportError:
            pass
        else:
            return ("msgspec", *with_msgspec(msgspec))
    return ("stdlib", stdlib_loads, stdlib_dumps)


#: C{"msgspec"} or C{"stdlib"}: the codec in use.
#: C{loads(line)}: decode a line of bytes, or raise L{JSONError}.
#: C{dumps(value)}: encode a value as compact UTF-8 bytes.
NAME, loads, dumps = _pick()
