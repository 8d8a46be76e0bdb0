"""
The benchmark: run it on your own machine (Linux: it reads /proc).

    python -m caps.bench                         # everything: several minutes on 2 cores
    python -m caps.bench --quick                 # a smoke run, small numbers
    python -m caps.bench --store memory,sqlite-full --runs 3
    python -m caps.bench --store redis,shared-1,shared-2,shared-3
    python -m caps.bench --json bench.json --chart bench.png
    python -m caps.bench --scaling --store memory  # and at 10k, 100k, 1M messages
    python -m caps.bench --stall                 # what commits do to the reactor

Each store (memory, memory-no-event-log, sqlite-full, sqlite-normal, redis,
redis-durable) gets
a real broker (twistd caps-broker) on loopback (one for throughput and
latency, a fresh one for catch-up and another for connections), driven by
raw-socket clients in processes of their own.  The shared stores,
shared-1, shared-2 and shared-3, get 1, 2 or 3 real brokers, all with
--store redis://... --shared on one Redis server (fsync every second, as
for redis): brokers sharing one Redis, a client on any of them
(docs/scaling.md); fresh ones, and a fresh Redis, for each part too.
shared-1 is one broker in that mode, to compare with redis.  First come
two bare relays (caps/relay.py), which decode every frame and encode every
delivery and keep nothing: "relay" (stdlib json, LineReceiver) and
"relay-fast" (orjson, LineOnlyReceiver), the floor a one-process Python
broker cannot go below.  Every figure is from one run on one machine,
where the load shares the CPUs with the broker: compare the rows of one
run (the ratios to the relay are there for that), not figures from
different runs or machines.

Throughput.  A producer publishes --messages orders (about 200 bytes of
JSON each) with up to --window unconfirmed; a consumer (prefetch 1,000,
the broker's default) acknowledges every one.  With shared-N, N such
pairs run at once, the messages split over them (the first pairs one
more while the remainder lasts), each producer with up to --window
unconfirmed: pair i publishes to queue bench-i through broker i, and
its consumer takes them from bench-i through broker i + 1 (modulo N), so
that with 2 or 3 brokers every message crosses from one broker to
another.
  msgs/s               messages over the time from the first publish to
                       the last acknowledgement handled by the broker (a
                       ping round trip after it); with shared-N, from the
                       earliest start of a producer to the latest end of
                       a consumer.
  broker CPU µs/msg    the broker process's own CPU time (all threads,
                       from /proc) over the run, per message: publish,
                       delivery and acknowledgement.  The steadiest figure.
                       With shared-N, the CPU time of its N brokers
                       together (the Redis server's is apart, below).
  Redis CPU µs/msg     with a Redis store, the CPU time of its Redis
                       server (a process of its own on loopback, started
                       by the benchmark: fsync every second for redis and
                       shared-N, before every answer for redis-durable)
                       per message; shared-N's N brokers share one.
  CPU vs relay         broker CPU per message over the lowest relay's in
                       the same run; msgs/s vs relay: msgs/s over the
                       highest relay's.

Latency.  A producer publishes --latency-messages orders at a steady
--rate (each at its own deadline, so a late one does not delay the rest),
each carrying its send time; the consumer takes the time each arrives.
With shared-N the producer publishes through the first broker and the
consumer subscribes through the last (another one if N > 1).
  p50 ... max          publish to delivery, in ms (CLOCK_MONOTONIC is one
                       clock for every process).
  confirm p50, p99     publish to the broker's ok: with sqlite-full, the
                       time to sync the commit to disk.
  sent msgs/s          the rate the producer kept up.

Catch-up.  A producer publishes a backlog of --backlog orders with no
consumer connected and waits for every confirmation; then a consumer
subscribes and acknowledges them all.  Not for the relays, which keep
nothing.  With shared-N the producer publishes through the first broker
and the consumer drains through the last.
  publish msgs/s       confirmed publishes a second, with nobody reading.
  drain msgs/s         the backlog over the time from the subscribe to
                       the last acknowledgement handled.
  drain CPU µs/msg     the broker's CPU time over the drain, per message
                       (shared-N: its N brokers together); Redis µs/msg,
                       the Redis server's.
  B/queued msg         the broker's resident memory (VmRSS) with the
                       backlog queued, less before, over the backlog.  With
                       SQLite it should not grow with the queue.  With
                       shared-N, the N brokers' together (RSS before and
                       queued too): the backlog waits in Redis.

Connections.  Another process opens --connections idle connections, each
subscribed as a client of its own (idle-1, idle-2, ...), and waits for
every ok.  B/connection: the broker's resident memory with them open, less
before, per connection.  With shared-N they are all on the first broker,
the others running beside it, and only its memory is counted.  The
file-descriptor limit is raised to its hard limit; if that is still too
low, fewer connections are opened, and a note says so.

Scaling (--scaling).  The memory store's throughput at each of
--scaling-sizes messages: wall and CPU time per message should stay flat
as the count grows, and the peak resident memory (VmHWM) too, unless the
queue builds up because the consumer falls behind.

--runs N runs everything N times and reports the median of each figure.
--json FILE writes it all (and a description of the machine) for
machines, --chart FILE.png the latency distribution and the throughput of
each store (needs matplotlib: pip install 'caps-broker[bench]').

The stall run (--stall) keeps a broker in this process on an SQLite store,
publishes into it in bursts from the reactor, and measures how late a
1 ms timer fires: with the store's writer thread (how the broker runs) and
with every commit run on the reactor thread instead, for comparison.
"""

import contextlib
import json
import sys
import tempfile

from twisted.python import usage

from caps import redisserver
from caps.bench import load
from caps.bench import report as report_
from caps.bench.broker import broker_process, peak_rss_bytes, raise_fd_limit
from caps.bench.measure import (
    MB,
    measure_connections,
    measure_drain,
    measure_latency,
    measure_throughput,
    no_drain,
)
from caps.bench.stall import run_stall
from caps.options import positive_int
from caps.redisserver import RedisServer

# The relays first: every other row is compared with them.  A relay's
# arguments go to caps.relay, a store's to twistd caps-broker.
RELAYS = ("relay", "relay-fast")
STORES = {
    "relay": (),
    "relay-fast": ("--fast",),
    "memory": ("--store", "memory"),
    "memory-no-event-log": ("--store", "memory", "--no-event-log"),
    "sqlite-full": ("--store", "sqlite:{dir}/bench.sqlite3", "--sync", "full"),
    "sqlite-normal": ("--store", "sqlite:{dir}/bench.sqlite3", "--sync", "normal"),
    "redis": ("--store", "{redis}"),
    "redis-durable": ("--store", "{redis}", "--redis-durable"),
    "shared-1": ("--store", "{redis}", "--shared"),
    "shared-2": ("--store", "{redis}", "--shared"),
    "shared-3": ("--store", "{redis}", "--shared"),
}
# The Redis server each Redis store runs on (caps.redisserver: loopback,
# an append-only file): Redis's usual fsync every second, or before every
# answer for --redis-durable.
REDIS_SERVERS = {
    "redis": ("--appendfsync", "everysec"),
    "redis-durable": ("--appendfsync", "always"),
    "shared-1": ("--appendfsync", "everysec"),
    "shared-2": ("--appendfsync", "everysec"),
    "shared-3": ("--appendfsync", "everysec"),
}
# The stores of several brokers on one Redis (--shared), and how many
# brokers each runs; every other store runs one.
BROKERS = {"shared-1": 1, "shared-2": 2, "shared-3": 3}
SCALING_STORE = "memory"
SECTIONS = ("throughput", "latency", "drain", "connections")
DEFAULTS = {
    "messages": 50_000,
    "latency-messages": 10_000,
    "backlog": 100_000,
    "connections": 10_000,
    "scaling-sizes": (10_000, 100_000, 1_000_000),
}
QUICK = {
    "messages": 2_000,
    "latency-messages": 400,
    "backlog": 2_000,
    "connections": 200,
    "scaling-sizes": (1_000, 2_000, 5_000),
}
# File descriptors a process needs besides its connections.
FD_SPARE = 64


def publish(address, messages, window, latencies=None):
    """
    Publish C{messages} orders from this process with at most C{window}
    unconfirmed; append each confirmation time (seconds) to C{latencies}
    if given.  For tests that need a quick load (test_slow_consumer).
    """
    with load.connect(address) as sock:
        load.publish(sock, messages, window, latencies)


@contextlib.contextmanager
def running(name, *extra, wrap=(), timeout=30.0, stop_timeout=10.0):
    """
    The brokers (or the relay) of store C{name}, a list (several for the
    shared stores, on one Redis), stopped on the way out (SIGKILL if one
    has not stopped C{stop_timeout} seconds after SIGTERM), with a
    C{start(target, *args, via=0)} that starts a client process of broker
    C{via}, stopped too (first).  C{wrap} and C{timeout} are
    L{broker_process}'s.
    """
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="caps-bench-"))
        places = {"dir": workdir}
        server = None
        if name in REDIS_SERVERS:
            server = RedisServer(*REDIS_SERVERS[name]).start()
            stack.callback(server.stop)
            places["redis"] = server.url
        args = [a.format(**places) for a in STORES[name]] + list(extra)
        brokers = []
        for _ in range(BROKERS.get(name, 1)):
            brokers.append(
                broker_process(
                    args,
                    relay=name in RELAYS,
                    store_pid=server and server.pid,
                    wrap=wrap,
                    timeout=timeout,
                )
            )
            stack.callback(brokers[-1].stop, stop_timeout)
        clients = []

        def alive(grace=0.0):
            for broker in brokers:
                broker.check(grace)

        def start(target, *args, via=0):
            label = target.__name__
            if len(brokers) > 1:
                label += f" of broker {via}"
            client = load.Client(
                target, brokers[via].address, *args, name=label, alive=alive
            )
            clients.append(client)
            return client

        try:
            yield brokers, start
        finally:
            for client in clients:
                client.stop()


def queues(name):
    """
    The queues of store C{name}'s throughput run, one per producer and
    consumer pair: C{bench-0}, C{bench-1}, ... for the shared stores, one
    for each broker, and C{bench} for the others.
    """
    if name in BROKERS:
        return tuple(b"bench-%d" % i for i in range(BROKERS[name]))
    return (load.QUEUE,)


def steps(settings):
    """
    The steps of a whole benchmark, as (store, part) in order.
    """
    one_run = []
    for name in settings["stores"]:
        one_run += [(name, "throughput"), (name, "latency")]
        if name not in RELAYS:
            one_run.append((name, "drain"))
        one_run.append((name, "connections"))
    for size in settings["scaling_sizes"]:
        one_run.append((SCALING_STORE, f"scaling {size:,}"))
    return one_run * settings["runs"]


def run_store(name, s, progress, samples):
    """
    One run of every part for store C{name}: its rows, by section.
    """
    rows = {}
    with running(name) as (brokers, start):
        progress.step(f"{name}: throughput")
        rows["throughput"] = measure_throughput(
            brokers, start, s["messages"], s["window"], queues(name)
        )
        progress.step(f"{name}: latency")
        rows["latency"], found = measure_latency(
            brokers, start, s["latency_messages"], s["rate"]
        )
        samples.extend(found)
    if name in RELAYS:
        rows["drain"] = no_drain(s["backlog"])
    else:
        progress.step(f"{name}: catch-up")
        # Room for the whole backlog in one queue.
        extra = ("--max-queue", str(s["backlog"])) if s["backlog"] > 1_000_000 else ()
        with running(name, *extra) as (brokers, start):
            rows["drain"] = measure_drain(brokers, start, s["backlog"], s["window"])
    progress.step(f"{name}: connections")
    with running(name) as (brokers, start):
        rows["connections"] = measure_connections(brokers, start, s["connections"])
    return {section: {"store": name, **row} for section, row in rows.items()}


def run_scaling(s, progress):
    """
    The scaling rows: throughput of the memory store at each size, each
    on a broker of its own, with its peak resident memory.
    """
    rows = []
    for size in s["scaling_sizes"]:
        progress.step(f"{SCALING_STORE}: scaling {size:,}")
        with running(SCALING_STORE) as (brokers, start):
            row = measure_throughput(brokers, start, size, s["window"])
            row["peak_rss_mb"] = peak_rss_bytes(brokers[0].pid) / MB
        row["wall_us_per_msg"] = 1e6 / row["msgs_per_s"]
        rows.append({"store": SCALING_STORE, **row})
    return rows


def run_benchmark(settings, notes, progress):
    """
    Every part for every store, C{settings["runs"]} times; the report,
    with medians if more than one run, and the latencies measured, by
    store, for the chart.
    """
    runs = []
    samples = {name: [] for name in settings["stores"]}
    for _ in range(settings["runs"]):
        sections = {section: [] for section in SECTIONS}
        for name in settings["stores"]:
            for section, row in run_store(
                name, settings, progress, samples[name]
            ).items():
                sections[section].append(row)
        report_.add_ratios(sections["throughput"], RELAYS)
        sections["scaling"] = run_scaling(settings, progress)
        runs.append(sections)
    report = {"machine": report_.machine(), "settings": settings}
    for section in (*SECTIONS, "scaling"):
        report[section] = report_.median_rows([run[section] for run in runs])
    report["notes"] = notes
    return report, samples


class Options(usage.Options):
    optFlags = [
        ["quick", "q", "Small numbers, for a smoke test (about half a minute)."],
        ["scaling", None, "Also run the memory store at each of --scaling-sizes."],
        ["stall", None, "Measure reactor stalls instead of everything else."],
    ]
    optParameters = [
        ["messages", "n", None, "Messages per store for throughput (default 50,000; "
         "with --stall, 100,000)", positive_int],
        ["window", "w", 1000, "Unconfirmed publishes in flight", positive_int],
        ["rate", None, 2000, "Messages a second in the latency run", positive_int],
        ["latency-messages", None, None, "Messages in the latency run (default 10,000)", positive_int],
        ["backlog", None, None, "Messages in the catch-up backlog (default 100,000)", positive_int],
        ["connections", None, None, "Idle connections to open (default 10,000)", positive_int],
        ["scaling-sizes", None, None, "Comma-separated message counts for --scaling "
         "(default 10000,100000,1000000)."],
        ["runs", None, 1, "Run everything this many times and report medians", positive_int],
        ["json", None, None, "Also write the results to this file as JSON."],
        ["chart", None, None, "Also draw the results to this PNG file (needs matplotlib)."],
    ]  # fmt: skip
    longdesc = (
        "What each figure means and how it is measured: python -m pydoc caps.bench"
    )

    def __init__(self):
        super().__init__()
        self["stores"] = []

    def opt_store(self, names):
        """Stores to run, comma-separated or repeated: relay, relay-fast, memory, memory-no-event-log, sqlite-full, sqlite-normal, redis, redis-durable, shared-1, shared-2, shared-3 (default: all; the relays always run; the Redis stores, shared-N too, need redis-server and redis-py)."""
        for name in names.split(","):
            if name not in STORES:
                raise usage.UsageError(f"--store must be among {', '.join(STORES)}")
            self["stores"].append(name)

    opt_s = opt_store

    def postOptions(self):
        sizes = self["scaling-sizes"]
        if sizes is not None:
            try:
                self["scaling-sizes"] = tuple(positive_int(n) for n in sizes.split(","))
            except ValueError:
                raise usage.UsageError(
                    "--scaling-sizes must be positive whole numbers, comma-separated"
                ) from None


def settings_from(options, fd_limit, orjson_present=True, redis_missing=None):
    """
    The settings of a run (the options, with the defaults of --quick or
    of a full run filled in) and notes about what had to be changed.

    @param redis_missing: why the Redis stores cannot run here, or L{None}.
    """
    sizes = QUICK if options["quick"] else DEFAULTS
    chosen = [name for name in STORES if name in options["stores"]] or list(STORES)
    stores = [name for name in STORES if name in RELAYS or name in chosen]
    notes = []
    if not orjson_present:
        stores.remove("relay-fast")
        notes.append("relay-fast skipped: orjson is not installed")
    if redis_missing and any(name in REDIS_SERVERS for name in stores):
        stores = [name for name in stores if name not in REDIS_SERVERS]
        notes.append(f"the Redis stores skipped: {redis_missing}")
    requested = options["connections"] or sizes["connections"]
    connections = min(requested, max(1, fd_limit - FD_SPARE))
    if connections < requested:
        notes.append(
            f"--connections lowered from {requested:,} to {connections:,}: the "
            f"open-file limit is {fd_limit:,} (raise the hard limit: ulimit -Hn)"
        )
    return {
        "stores": stores,
        "messages": options["messages"] or sizes["messages"],
        "window": options["window"],
        "rate": options["rate"],
        "latency_messages": options["latency-messages"] or sizes["latency-messages"],
        "backlog": options["backlog"] or sizes["backlog"],
        "connections": connections,
        "connections_requested": requested,
        "scaling_sizes": (
            list(options["scaling-sizes"] or sizes["scaling-sizes"])
            if options["scaling"]
            else []
        ),
        "runs": options["runs"],
    }, notes


def main(argv):
    from caps import app

    options = app.parse(Options(), argv)
    if options["stall"]:
        bursts = max(1, (options["messages"] or 100_000) // 100)
        rows = [run_stall(bursts, threaded=True), run_stall(bursts, threaded=False)]
        columns = [
            (k, k, "{:,.1f}" if isinstance(v, float) else "{:,}")
            for k, v in rows[0].items()
        ]
        print(report_.table(rows, columns))
        if options["json"]:
            with open(options["json"], "w") as f:
                json.dump(rows, f, indent=2)
        return
    try:
        import orjson  # noqa: F401
    except ImportError:
        orjson_present = False
    else:
        orjson_present = True
    settings, notes = settings_from(
        options, raise_fd_limit(), orjson_present, redisserver.skip_reason
    )
    progress = report_.Progress(len(steps(settings)))
    try:
        report, samples = run_benchmark(settings, notes, progress)
    except RuntimeError as e:
        raise SystemExit(f"\ncaps.bench: {e}") from None
    progress.finish()
    sys.stdout.write(report_.render(report))
    sys.stdout.flush()
    if options["json"]:
        with open(options["json"], "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if options["chart"]:
        report_.chart(options["chart"], report, samples, RELAYS)
