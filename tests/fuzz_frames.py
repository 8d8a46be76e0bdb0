"""
A coverage-guided fuzz target (atheris, on libFuzzer) for the frame parser
and the broker's protocol: the counterpart of tests/test_fuzz.py.

    tox -e fuzz                                    # 60 s; the corpus stays in .tox/fuzz/corpus
    python tests/fuzz_frames.py -max_total_time=60 -rss_limit_mb=2048 CORPUS_DIR

Each input is:

  - parsed, up to its first newline, by L{caps.frames.parse_line}, which
    returns a command or raises L{caps.frames.ProtocolError}, nothing else;
    where L{caps.fastframes} takes the line, its command is the same;
  - decoded by both JSON codecs (msgspec where installed, and the standard
    library's), which accept and refuse the same lines, with the same
    values (L{caps.codec} promises it);
  - sent to a fresh broker connection's C{dataReceived}, which raises
    nothing, logs no failure and answers no C{internal-error}; every line
    it writes is a JSON object.

Anything else is a crash: libFuzzer stops and writes the input to
crash-<sha1> in the working directory.  Not named test_*: neither trial nor
pytest collects it.
"""

import json
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["caps"]):
    import caps.codec
    import caps.fastframes
    import caps.frames
    from caps.broker import Broker
    from caps.protocol import BrokerFactory

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

try:
    import msgspec
except ImportError:
    msgspec = None

# Small, so that inputs of libFuzzer's sizes reach line-too-long too.
MAX_LINE = 1024
SEEDS = [
    b'{"event":"ping","id":1,"payload":{"still":"here"}}\n',
    b'{"event":"subscribe","id":1,"payload":{"clientId":"acme","event":"delivered",'
    b'"filter":{"store":"acme"},"prefetch":3,"ackTimeout":120,"maxLength":10}}\n'
    b'{"event":"delivered","id":2,"to":["acme","b"],"messageId":"d1","ttl":5,'
    b'"payload":{"store":"acme"}}\n',
    b'{"event":"received","id":3,"payload":{"clientId":"acme","event":"delivered",'
    b'"messageId":"d1"}}\n',
    b'{"event":"nack","id":4,"payload":{"clientId":"a","event":"e","messageId":"m",'
    b'"delay":1.5}}\n{"event":"requeue","payload":{"clientId":"a","event":"e"}}\n',
    b'{"event":"unsubscribe","id":"u","payload":{"clientId":"a","event":"e.dead",'
    b'"delete":true}}\r\n{"event":"getAll","payload":{"clientId":"a","event":"e"}}\n',
]
DICTIONARY = [
    *('"event"', '"payload"', '"id"', '"to"', '"messageId"', '"ttl"', '"clientId"'),
    *('"filter"', '"prefetch"', '"ackTimeout"', '"maxLength"', '"delete"', '"delay"'),
    *('"subscribe"', '"unsubscribe"', '"getAll"', '"received"', '"nack"'),
    *('"requeue"', '"ping"', '"ok"', '".dead"', "true", "false", "null"),
    *("NaN", "Infinity", "1e999", "18446744073709551616", "\\ud800", "\\u0000"),
    *("\\n", "\\r\\n", "[", "]", "{", "}", ":", ","),
]
PROTOCOL_ERROR = caps.frames.ProtocolError


class _Logged:
    """
    Records failures logged while an input is handled.
    """

    def __init__(self):
        self.failures = []

    def __call__(self, event):
        failure = event.get("log_failure")
        if failure is not None:
            self.failures.append(failure.getTraceback())


_logged = _Logged()
_codecs = [caps.codec.stdlib_loads]
if msgspec is not None:
    _codecs.append(caps.codec.with_msgspec(msgspec)[0])


def _tokens(value):
    """
    A flat, typed form of a JSON value, without recursion (values may be
    nested 1000 deep): 1 and 1.0 differ, as do True and 1.
    """
    out, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.append(("dict", len(item)))
            for key, child in item.items():
                out.append(("key", key))
                stack.append(child)
        elif isinstance(item, list):
            out.append(("list", len(item)))
            stack.extend(reversed(item))
        elif isinstance(item, float):
            out.append(("float", item.hex()))
        else:
            out.append((type(item).__name__, item))
    return out


def _decode(loads, line):
    try:
        return _tokens(loads(line))
    except caps.codec.JSONError:
        return "refused"


def _check_parser(line):
    try:
        parsed = caps.frames.parse_line(line)
    except PROTOCOL_ERROR:
        parsed = "refused"
    fast = caps.fastframes.fast(line)
    if fast is not None and fast != parsed:
        raise AssertionError(f"the fast path differs on {line!r}")
    results = [_decode(loads, line) for loads in _codecs]
    if any(result != results[0] for result in results):
        raise AssertionError(f"the codecs differ on {line!r}")


def _check_protocol(data):
    del _logged.failures[:]
    clock = Clock()
    broker = Broker(clock, log_events=False)
    protocol = BrokerFactory(broker, max_line=MAX_LINE).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    protocol.dataReceived(b"\n")
    protocol.connectionLost(None)
    broker.stop()
    if _logged.failures:
        raise AssertionError("logged:\n" + "\n".join(_logged.failures))
    out = transport.value()
    if out and not out.endswith(b"\n"):
        raise AssertionError(f"an unfinished line: {out[-100:]!r}")
    for line in out.split(b"\n")[:-1]:
        frame = json.loads(line)
        if not isinstance(frame, dict) or not isinstance(frame.get("event"), str):
            raise AssertionError(f"not a frame: {line!r}")
        if frame["event"] == "error":
            code = frame["payload"]["code"]
            if code == "internal-error":
                raise AssertionError(f"internal-error for {data!r}")


def TestOneInput(data):
    _check_parser(data.split(b"\n", 1)[0])
    _check_protocol(data)


def _prepare(argv):
    """
    Create the corpus directories named on the command line, seed an empty
    one with valid frames, and give libFuzzer a dictionary of JSON and
    frame tokens (beside the first corpus, CORPUS.dict) unless one is
    given.
    """
    # (A file is an input to run once, as when reproducing a crash.)
    corpora = [a for a in argv[1:] if not a.startswith("-") and not os.path.isfile(a)]
    for corpus in corpora:
        os.makedirs(corpus, exist_ok=True)
        if not os.listdir(corpus):
            for n, seed in enumerate(SEEDS):
                with open(os.path.join(corpus, f"seed-{n}"), "wb") as f:
                    f.write(seed)
    if not any(arg.startswith("-dict=") for arg in argv):
        if corpora:
            path = corpora[0].rstrip(os.sep) + ".dict"
            f = open(path, "w")
        else:
            fd, path = tempfile.mkstemp(prefix="caps-fuzz-", suffix=".dict")
            f = os.fdopen(fd, "w")
        with f:
            f.writelines(json.dumps(token) + "\n" for token in DICTIONARY)
        argv.append(f"-dict={path}")
    return argv


def main():
    globalLogBeginner.beginLoggingTo([_logged], redirectStandardIO=False)
    atheris.Setup(_prepare(list(sys.argv)), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
