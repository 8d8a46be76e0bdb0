"""
C{python -m caps.bench.instructions}: the CPU instructions each store's
broker process executes per message, and the fast relay's, counted by
valgrind's callgrind.  Unlike CPU time, an instruction count is the same
however busy the machine is, so two versions, or a store and the relay,
can be compared on a noisy machine (docs/performance.md).

Each store's process (twistd caps-broker, or caps.relay for the relays)
is started as in L{caps.bench}, under
C{valgrind --tool=callgrind}, and given the benchmark's throughput run
(one producer with up to C{--window} unconfirmed, one consumer
acknowledging every message) twice, on a fresh process each time: with
C{--small} and with C{--large} messages.  The difference between the two
counts over the difference in messages is the instructions per message:
publish, delivery and acknowledgement, all threads (the SQLite writer's
too), without the process's start and stop.  Instructions are not time:
they leave out the kernel's work and what cache misses cost, so the
ratios here are lower than those of CPU time (docs/performance.md says by
how much).

    python -m caps.bench.instructions                    # the default stores, 5,000 and 25,000
    python -m caps.bench.instructions -s memory,sqlite-full --small 2000 --large 10000

Under callgrind a broker runs about 50 times slower: the default takes
about a minute per store here, two processes at a time (C{--jobs}).
relay-fast is always counted, as the floor every row is compared with.
"""

import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from twisted.python import usage

from caps.bench import BROKERS, STORES, running
from caps.bench.measure import measure_throughput
from caps.bench.report import table
from caps.options import positive_int

FLOOR = "relay-fast"
DEFAULT_STORES = ("memory", "memory-no-event-log", "sqlite-full", "sqlite-normal")
# Several brokers would write one callgrind file.
COUNTABLE = [name for name in STORES if BROKERS.get(name, 1) == 1]
# Seconds a process under callgrind may take to listen, and to stop.
SLOW = 300.0
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


class Options(usage.Options):
    synopsis = "python -m caps.bench.instructions [options]"
    optParameters = [
        ["small", None, 5_000, "Messages in the smaller run.", positive_int],
        ["large", None, 25_000, "Messages in the larger run.", positive_int],
        ["window", "w", 1_000, "Unconfirmed publishes in flight.", positive_int],
        ["jobs", "j", 2, "Processes counted at once.", positive_int],
        ["valgrind", None, "valgrind", "The valgrind command."],
    ]

    def __init__(self):
        super().__init__()
        self["stores"] = []

    def opt_store(self, names):
        """Stores to count, comma-separated or repeated (default: memory, memory-no-event-log, sqlite-full, sqlite-normal; relay-fast always runs first)."""
        for name in filter(None, names.split(",")):
            if name not in COUNTABLE:
                raise usage.UsageError(f"--store must be among {', '.join(COUNTABLE)}")
            self["stores"].append(name)

    opt_s = opt_store

    def postOptions(self):
        if self["large"] <= self["small"]:
            raise usage.UsageError("--large must be more than --small")
        if shutil.which(self["valgrind"]) is None:
            raise usage.UsageError(f"{self['valgrind']} not found: install valgrind")


def total(path):
    """
    The instructions a callgrind output file counts, all threads.
    """
    try:
        with open(path, "rb") as f:
            match = _TOTAL.search(f.read())
    except OSError as e:
        raise RuntimeError(f"{path}: {e.strerror}: did valgrind finish?") from None
    if match is None:
        raise RuntimeError(f"{path} has no total: did valgrind finish?")
    return int(match.group(1))


def count(name, messages, window, valgrind, out):
    """
    The instructions store C{name}'s process executes from its start to
    its stop, around a throughput run of C{messages}.
    """
    wrap = (valgrind, "--tool=callgrind", f"--callgrind-out-file={out}")
    with running(name, wrap=wrap, timeout=SLOW, stop_timeout=SLOW) as (brokers, start):
        measure_throughput(brokers, start, messages, window)
    return total(out)


def per_message(names, small, large, window, valgrind, jobs):
    """
    Instructions per message of each store of C{names}: the difference
    between a run of C{large} and one of C{small} messages, over C{large -
    small}.  Up to C{jobs} processes are counted at once (what one counts
    does not depend on the others).
    """
    with tempfile.TemporaryDirectory(prefix="caps-instructions-") as workdir:
        runs = [(name, n) for name in names for n in (small, large)]
        with ThreadPoolExecutor(jobs) as pool:
            counts = pool.map(
                lambda run: count(
                    *run, window, valgrind, os.path.join(workdir, "%s.%d.out" % run)
                ),
                runs,
            )
            counted = dict(zip(runs, counts, strict=True))
    return {
        name: (counted[name, large] - counted[name, small]) / (large - small)
        for name in names
    }


def main(argv):
    from caps import app

    options = app.parse(Options(), argv)
    names = [FLOOR] + [
        n for n in dict.fromkeys(options["stores"] or DEFAULT_STORES) if n != FLOOR
    ]
    print(f"counting {', '.join(names)} ...", file=sys.stderr, flush=True)
    try:
        each = per_message(
            names,
            options["small"],
            options["large"],
            options["window"],
            options["valgrind"],
            options["jobs"],
        )
    except RuntimeError as e:
        raise SystemExit(f"caps.bench.instructions: {e}") from None
    rows = [
        {"store": name, "per_message": each[name], "vs_floor": each[name] / each[FLOOR]}
        for name in names
    ]
    print(
        f"Instructions per message (callgrind), throughput runs of "
        f"{options['small']:,} and {options['large']:,} messages"
    )
    print(
        table(
            rows,
            [
                ("store", "store", None),
                ("instructions/msg", "per_message", "{:,.0f}"),
                (f"vs {FLOOR} (x)", "vs_floor", "{:.2f}"),
            ],
        )
    )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
