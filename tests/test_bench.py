"""
The benchmark: a smoke run to keep it working (small numbers, real
processes; the figures themselves are not checked, since benchmarks are
not timed tests), and its parts that need no processes.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import skipIf

from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caps import bench, redisserver
from caps.bench import instructions as benchinstructions
from caps.bench import load as benchload
from caps.bench import measure as benchmeasure
from caps.bench import report as benchreport
from caps.relay import FastRelay, Relay, RelayFactory

try:
    import orjson  # noqa: F401
except ImportError:
    HAVE_ORJSON = False
else:
    HAVE_ORJSON = True

STORES = ["relay", "relay-fast", "memory", "memory-no-event-log"]
STORES += ["sqlite-full", "sqlite-normal"]
if not HAVE_ORJSON:
    STORES.remove("relay-fast")
if redisserver.AVAILABLE:
    STORES += ["redis", "redis-durable", "shared-1", "shared-2", "shared-3"]


def run_bench(scratch, *args):
    """
    Run C{python -m caps.bench --json FILE *args} in directory C{scratch};
    its standard output and the JSON it wrote.
    """
    out = os.path.join(scratch, "bench.json")
    result = subprocess.run(
        [sys.executable, "-m", "caps.bench", "--json", out, *args],
        capture_output=True,
        timeout=300,
        cwd=scratch,
    )
    assert result.returncode == 0, result.stderr.decode()
    with open(out) as f:
        return result.stdout.decode(), json.load(f)


# The smoke runs are module-level tests, so pytest runs them and trial does
# not collect them: they take over a minute of real brokers, and a second
# run under trial's CAPS_JSON=stdlib would check the same report again.


def test_quick_run(tmp_path):
    """A quick run measures every section for the relays and every store, with a JSON report and a PNG chart."""
    text, report = run_bench(tmp_path, "--quick", "--scaling", "--chart", "chart.png")
    assert set(report) == {"machine", "settings", "notes", *bench.SECTIONS, "scaling"}
    assert report["machine"]["cpus"] == os.cpu_count()
    for section in bench.SECTIONS:
        assert [r["store"] for r in report[section]] == STORES, section
    relays = [r for r in report["throughput"] if r["store"] in bench.RELAYS]
    assert min(r["cpu_vs_relay"] for r in relays) == 1.0
    assert max(r["throughput_vs_relay"] for r in relays) == 1.0
    for row in report["throughput"]:
        assert row["messages"] == bench.QUICK["messages"]
        for key in ("msgs_per_s", "broker_cpu_us_per_msg", "cpu_vs_relay"):
            assert row[key] > 0, row
        if row["store"] in bench.REDIS_SERVERS:
            assert row["store_cpu_us_per_msg"] > 0, row
        else:
            assert row["store_cpu_us_per_msg"] is None, row
    for row in report["latency"]:
        figures = [row[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms")]
        assert figures == sorted(figures), row
        assert figures[0] > 0, row
        assert row["max_ms"] >= figures[-1], row
        assert row["confirm_p99_ms"] > 0, row
    for row in report["drain"]:
        if row["store"] in bench.RELAYS:
            assert row["drain_msgs_per_s"] is None
        else:
            assert row["drain_msgs_per_s"] > 0, row
            assert row["publish_msgs_per_s"] > 0, row
            assert isinstance(row["bytes_per_queued_msg"], float)
    for row in report["connections"]:
        assert row["connections"] == bench.QUICK["connections"]
        assert row["bytes_per_connection"] > 0, row
    assert [r["messages"] for r in report["scaling"]] == list(
        bench.QUICK["scaling-sizes"]
    )
    for row in report["scaling"]:
        assert row["peak_rss_mb"] > 0, row
    with open(tmp_path / "chart.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for title in ("Throughput", "Latency", "Catch-up", "Connections", "Scaling"):
        assert title in text
    assert "broker CPU µs/msg" in text


def test_stall_smoke(tmp_path):
    """The stall run compares the writer thread with commits on the reactor."""
    _, rows = run_bench(tmp_path, "--stall", "--messages", "2000")
    assert [r["writer"] for r in rows] == ["thread", "reactor"]
    assert {r["messages"] for r in rows} == {2000}


@skipIf(shutil.which("valgrind") is None, "needs valgrind")
def test_instructions_smoke():
    """python -m caps.bench.instructions counts the fast relay's and the broker's instructions per message under callgrind, and the broker, which keeps what the relay does not, executes more."""
    result = subprocess.run(
        [sys.executable, "-m", "caps.bench.instructions", "-s", "memory"]
        + ["--small", "100", "--large", "300"],
        capture_output=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr.decode()
    rows = dict(
        re.findall(r"^(relay-fast|memory) +([\d,]+) ", result.stdout.decode(), re.M)
    )
    relay, broker = (
        int(rows[name].replace(",", "")) for name in ("relay-fast", "memory")
    )
    assert 0 < relay < broker


class InstructionsOptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        options = benchinstructions.Options()
        options.parseOptions(["--valgrind", sys.executable, *argv])
        return options

    def test_defaults(self):
        """By default the four single-broker stores are counted, at 5,000 and 25,000 messages."""
        options = self.parse()
        self.assertEqual(
            (options["stores"], options["small"], options["large"]), ([], 5000, 25000)
        )
        self.assertEqual(
            benchinstructions.DEFAULT_STORES,
            ("memory", "memory-no-event-log", "sqlite-full", "sqlite-normal"),
        )

    def test_sizes(self):
        """The larger run must be larger."""
        self.assertRaises(
            usage.UsageError, self.parse, "--small", "300", "--large", "300"
        )

    def test_stores(self):
        """Stores of one broker (shared-1 too) can be counted; several brokers cannot (one callgrind file each would be needed)."""
        self.assertEqual(
            self.parse("-s", "redis,memory,shared-1")["stores"],
            ["redis", "memory", "shared-1"],
        )
        self.assertRaises(usage.UsageError, self.parse, "-s", "shared-2")
        self.assertRaises(usage.UsageError, self.parse, "-s", "nothing")

    def test_without_valgrind(self):
        """Without valgrind it says so, instead of failing at the first broker."""
        options = benchinstructions.Options()
        error = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--valgrind", "/nonexistent/valgrind"],
        )
        self.assertIn("install valgrind", str(error))

    def test_total(self):
        """The count is read from callgrind's totals line, all threads together."""
        scratch = tempfile.TemporaryDirectory(prefix="caps-test-")
        self.addCleanup(scratch.cleanup)
        path = os.path.join(scratch.name, "callgrind.out")
        with open(path, "wb") as f:
            f.write(b"events: Ir\nfn=main\n12 5\nsummary: 123456\ntotals: 123456\n")
        self.assertEqual(benchinstructions.total(path), 123456)
        with open(path, "wb") as f:
            f.write(b"events: Ir\n")
        self.assertRaises(RuntimeError, benchinstructions.total, path)
        os.remove(path)
        error = self.assertRaises(RuntimeError, benchinstructions.total, path)
        self.assertIn("did valgrind finish?", str(error))


class LoopbackTests(SynchronousTestCase):
    def test_loopback(self):
        """python -m caps.bench.loopback has every message published, delivered and acknowledged: through the broker, through the relay, and as a catch-up on SQLite."""
        for extra in (
            [],
            ["--relay"],
            ["--store", "sqlite-normal", "--catch-up", "--window", "300"],
        ):
            result = subprocess.run(
                [sys.executable, "-m", "caps.bench.loopback", "-n", "2000", *extra],
                capture_output=True,
                timeout=120,
            )
            self.assertEqual(result.returncode, 0, result.stderr.decode())
            self.assertIn(b"2,000 messages acknowledged", result.stdout)


class OptionsTests(SynchronousTestCase):
    def settings(self, *argv, fd_limit=20_000, orjson_present=True, redis_missing=None):
        options = bench.Options()
        options.parseOptions(argv)
        return bench.settings_from(options, fd_limit, orjson_present, redis_missing)

    def test_defaults(self):
        """Without options every store runs, with the issue's numbers."""
        settings, notes = self.settings()
        self.assertEqual(settings["stores"], list(bench.STORES))
        self.assertEqual(settings["messages"], 50_000)
        self.assertEqual(settings["connections"], 10_000)
        self.assertEqual(settings["scaling_sizes"], [])
        self.assertEqual(notes, [])

    def test_store_subset(self):
        """--store takes comma lists and repeats, keeps the table's order, and always keeps the relays."""
        settings, _ = self.settings("--store", "sqlite-full,memory", "-s", "memory")
        self.assertEqual(
            settings["stores"], ["relay", "relay-fast", "memory", "sqlite-full"]
        )

    def test_unknown_store(self):
        """An unknown store name is a usage error."""
        self.assertRaises(usage.UsageError, self.settings, "--store", "mongodb")

    def test_scaling_sizes(self):
        """--scaling-sizes is a comma list of positive counts, used with --scaling."""
        settings, _ = self.settings("--scaling", "--scaling-sizes", "10,20")
        self.assertEqual(settings["scaling_sizes"], [10, 20])
        self.assertRaises(usage.UsageError, self.settings, "--scaling-sizes", "10,x")

    def test_too_few_file_descriptors(self):
        """With too low a file limit fewer connections are opened, and a note says so."""
        settings, notes = self.settings("--connections", "5000", fd_limit=1024)
        self.assertEqual(settings["connections"], 1024 - bench.FD_SPARE)
        self.assertEqual(settings["connections_requested"], 5000)
        self.assertIn("lowered from 5,000 to 960", notes[0])

    def test_without_orjson(self):
        """Without orjson the fast relay is left out, and a note says so."""
        settings, notes = self.settings(orjson_present=False)
        self.assertNotIn("relay-fast", settings["stores"])
        self.assertIn("orjson", notes[0])

    def test_shared_stores(self):
        """The shared stores are part of everything, and can be chosen alone."""
        settings, _ = self.settings()
        self.assertEqual(settings["stores"][-3:], ["shared-1", "shared-2", "shared-3"])
        settings, _ = self.settings("--store", "shared-2")
        self.assertEqual(settings["stores"], ["relay", "relay-fast", "shared-2"])

    def test_without_redis(self):
        """Where Redis cannot run, the Redis stores are left out, and a note says why."""
        settings, notes = self.settings(redis_missing="redis-server is not installed")
        for name in ("redis", "redis-durable", "shared-1", "shared-2", "shared-3"):
            self.assertNotIn(name, settings["stores"])
        self.assertIn("memory", settings["stores"])
        self.assertEqual(
            notes, ["the Redis stores skipped: redis-server is not installed"]
        )


class ReportTests(SynchronousTestCase):
    def test_percentile(self):
        """Percentiles are nearest-rank: p50 of 1..10 is 5, p99 is 10."""
        values = list(range(10, 0, -1))
        self.assertEqual(benchreport.percentile(values, 0.5), 5)
        self.assertEqual(benchreport.percentile(values, 0.99), 10)
        self.assertEqual(benchreport.percentile(values, 0.0), 1)

    def test_ratios_to_the_fastest_relay(self):
        """Each row is compared with the lowest relay CPU and the highest relay throughput."""
        rows = [
            {"store": "relay", "broker_cpu_us_per_msg": 20.0, "msgs_per_s": 40.0},
            {"store": "relay-fast", "broker_cpu_us_per_msg": 5.0, "msgs_per_s": 100.0},
            {"store": "memory", "broker_cpu_us_per_msg": 10.0, "msgs_per_s": 50.0},
        ]
        benchreport.add_ratios(rows, bench.RELAYS)
        self.assertEqual([r["cpu_vs_relay"] for r in rows], [4.0, 1.0, 2.0])
        self.assertEqual([r["throughput_vs_relay"] for r in rows], [0.4, 1.0, 0.5])

    def test_no_ratio_without_relay_cpu(self):
        """A relay that showed no CPU time gives no ratio rather than a division by zero."""
        rows = [
            {"store": "relay", "broker_cpu_us_per_msg": 0.0, "msgs_per_s": 40.0},
            {"store": "memory", "broker_cpu_us_per_msg": 10.0, "msgs_per_s": 50.0},
        ]
        benchreport.add_ratios(rows, bench.RELAYS)
        self.assertIsNone(rows[1]["cpu_vs_relay"])
        self.assertEqual(rows[1]["throughput_vs_relay"], 1.25)

    def test_median_of_runs(self):
        """Several runs merge into the median of each figure per store; missing figures stay missing."""
        runs = [
            [{"store": "memory", "msgs_per_s": v, "drain": None}] for v in (3, 1, 2)
        ]
        self.assertEqual(
            benchreport.median_rows(runs),
            [{"store": "memory", "msgs_per_s": 2, "drain": None}],
        )

    def test_table(self):
        """The table aligns names left and figures right, with a dash for a missing figure."""
        rows = [{"store": "relay", "x": 1234.5}, {"store": "memory-x", "x": None}]
        text = benchreport.table(
            rows, [("store", "store", None), ("x/s", "x", "{:,.0f}")]
        )
        self.assertEqual(
            text.splitlines(),
            ["store       x/s", "relay     1,234", "memory-x      -"],
        )

    def test_progress_on_a_log(self):
        """Off a terminal the progress bar writes one line per step."""
        stream = io.StringIO()
        progress = benchreport.Progress(2, stream=stream, width=4, clock=lambda: 0)
        progress.step("relay: throughput")
        progress.step("relay: latency")
        progress.finish()
        self.assertEqual(
            stream.getvalue().splitlines(),
            [
                "[....] 0/2 0:00 relay: throughput",
                "[##..] 1/2 0:00 relay: latency",
                "[####] 2/2 0:00 done",
            ],
        )

    def test_progress_on_a_terminal(self):
        """On a terminal the progress bar redraws one line, and ends it when done."""

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        stream = Terminal()
        progress = benchreport.Progress(1, stream=stream, width=4, clock=lambda: 0)
        progress.step("memory: latency")
        progress.finish()
        self.assertNotIn("\n", stream.getvalue()[:-1])
        self.assertEqual(stream.getvalue().count("\r"), 2)
        self.assertTrue(stream.getvalue().endswith("\n"))


class FakeClient:
    """
    A client process that is not: it records how it was started and
    reports at once, taking C{clock} (a list of one count) for its times.
    """

    def __init__(self, target, args, via, clock):
        self.target = target
        self.args = args
        self.via = via
        self.clock = clock
        self.words = []

    def expect(self, kind, timeout=None):
        self.clock[0] += 1
        return {"start": self.clock[0] * 10**9, "end": self.clock[0] * 10**9}

    def send(self, word):
        self.words.append(word)


class FakeBroker:
    """
    A broker for the measures: this process stands in for its PID.
    """

    pid = os.getpid()
    store_pid = None


class MeasureTests(SynchronousTestCase):
    def test_split(self):
        """Messages are split as evenly as can be, the first pairs taking the remainder."""
        self.assertEqual(benchmeasure.split(10, 3), [4, 3, 3])
        self.assertEqual(benchmeasure.split(11, 3), [4, 4, 3])
        self.assertEqual(benchmeasure.split(9, 3), [3, 3, 3])
        self.assertEqual(benchmeasure.split(7, 1), [7])
        self.assertEqual(benchmeasure.split(2, 3), [1, 1, 0])

    def test_queues(self):
        """A shared store has a queue for each of its brokers; the others the one bench queue."""
        self.assertEqual(bench.queues("shared-3"), (b"bench-0", b"bench-1", b"bench-2"))
        self.assertEqual(bench.queues("shared-1"), (b"bench-0",))
        self.assertEqual(bench.queues("memory"), (b"bench",))

    def test_pairs_cross_brokers(self):
        """Pair i publishes to bench-i through broker i and consumes it through the next broker; time runs from the first start to the last end."""
        clock = [0]
        started = []

        def start(target, *args, via=0):
            started.append(FakeClient(target, args, via, clock))
            return started[-1]

        row = benchmeasure.measure_throughput(
            [FakeBroker()] * 3, start, 10, 50, bench.queues("shared-3")
        )
        self.assertEqual(
            [(c.target.__name__, c.args, c.via) for c in started],
            [
                ("consumer", (4, False, False, b"bench-0"), 1),
                ("consumer", (3, False, False, b"bench-1"), 2),
                ("consumer", (3, False, False, b"bench-2"), 0),
                ("producer", (4, 50, b"bench-0"), 0),
                ("producer", (3, 50, b"bench-1"), 1),
                ("producer", (3, 50, b"bench-2"), 2),
            ],
        )
        self.assertEqual([c.words for c in started], [[]] * 3 + [["go"]] * 3)
        # Ready: 1 to 6; the producers' done: 7 to 9, the consumers': 10 to 12.
        self.assertEqual(row["seconds"], 12 - 7)
        self.assertEqual(row["msgs_per_s"], 10 / 5)
        self.assertIsNone(row["store_cpu_us_per_msg"])

    def test_pairs_without_messages(self):
        """A pair left with no message to carry is not started."""
        clock = [0]
        started = []

        def start(target, *args, via=0):
            started.append(FakeClient(target, args, via, clock))
            return started[-1]

        benchmeasure.measure_throughput(
            [FakeBroker()] * 3, start, 2, 50, bench.queues("shared-3")
        )
        self.assertEqual(
            [(c.target.__name__, c.via) for c in started],
            [("consumer", 1), ("consumer", 2), ("producer", 0), ("producer", 1)],
        )


class LoadTests(SynchronousTestCase):
    def test_publish_frame(self):
        """A publish is one JSON line addressed to the bench queue, of about 200 bytes, with its send time."""
        line = benchload.PUBLISH % (7, 123456789)
        frame = json.loads(line)
        self.assertEqual(frame["id"], 7)
        self.assertEqual(frame["to"], "bench")
        self.assertEqual(frame["payload"]["sent"], 123456789)
        self.assertTrue(180 <= len(json.dumps(frame["payload"])) <= 240)

    def test_frames_for_a_queue(self):
        """The templates built for another queue publish to it, subscribe to it and acknowledge in it."""
        frame = json.loads(benchload.publish_frame(b"bench-2") % (3, 42))
        self.assertEqual((frame["to"], frame["id"]), ("bench-2", 3))
        self.assertEqual(frame["payload"]["sent"], 42)
        self.assertEqual(benchload.publish_frame(), benchload.PUBLISH)
        ack = json.loads(benchload.ack_head(b"bench-2") + b"17" + benchload.ACK_TAIL)
        self.assertEqual(
            ack["payload"],
            {"clientId": "bench-2", "event": "order", "messageId": "17"},
        )
        self.assertEqual(benchload.ack_head(), benchload.ACK_HEAD)
        subscribe = json.loads(benchload.SUBSCRIBE % b"bench-2")
        self.assertEqual(subscribe["payload"]["clientId"], "bench-2")

    def test_broker_error(self):
        """An error frame from the broker stops the client with the broker's words."""
        error = b'{"event":"error","payload":{"code":"queue-full"},"id":3}\n'
        with self.assertRaises(RuntimeError) as raised:
            benchload.check(error[:12], b"")
            benchload.check(error[12:], error[:12])
        self.assertIn("queue-full", str(raised.exception))

    def test_client_failure(self):
        """A client process that fails is reported with its traceback, and ends."""
        client = benchload.Client(_fail)
        self.addCleanup(client.stop)
        with self.assertRaises(RuntimeError) as raised:
            client.expect("ready", timeout=30)
        self.assertIn("ZeroDivisionError", str(raised.exception))
        client.stop()
        self.assertFalse(client.process.is_alive())


def _fail(pipe):
    raise ZeroDivisionError("a client that fails")


class RelayTests(SynchronousTestCase):
    def relay(self, fast):
        factory = RelayFactory(fast=fast)
        consumer = factory.buildProtocol(None)
        producer = factory.buildProtocol(None)
        for protocol in (consumer, producer):
            protocol.makeConnection(StringTransport())
        return consumer, producer

    def check_relay(self, fast, kind):
        consumer, producer = self.relay(fast)
        self.assertIsInstance(consumer, kind)
        consumer.dataReceived(
            b'{"event":"subscribe","id":0,"payload":{"clientId":"b","event":"e"}}\n'
        )
        producer.dataReceived(b'{"event":"e","to":"b","id":5,"payload":{"n":1}}\n')
        producer.dataReceived(b'{"event":"ping","id":"x"}\n')
        replies = [json.loads(x) for x in producer.transport.value().splitlines()]
        self.assertEqual(
            replies,
            [
                {"event": "ok", "payload": {"messageId": "1", "queues": 1}, "id": 5},
                {"event": "pong", "payload": {}, "id": "x"},
            ],
        )
        lines = consumer.transport.value().splitlines()
        self.assertEqual(json.loads(lines[1])["payload"], {"n": 1})
        self.assertEqual(json.loads(lines[1])["messageId"], "1")

    def test_relay(self):
        """The relay answers a publish and delivers it to the subscriber."""
        self.check_relay(False, Relay)

    def test_fast_relay(self):
        """The fast relay does the same with orjson and LineOnlyReceiver."""
        if not HAVE_ORJSON:
            raise self.skipTest("orjson is not installed")
        self.check_relay(True, FastRelay)
