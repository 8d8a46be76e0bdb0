"""
A smoke run of the benchmark, to keep it working: small numbers, real
processes.  The figures themselves are not checked: benchmarks are not
timed tests.
"""

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase


class BenchTests(SynchronousTestCase):
    def run_bench(self, *args):
        scratch = tempfile.TemporaryDirectory(prefix="caps-bench-test-")
        self.addCleanup(scratch.cleanup)
        out = os.path.join(scratch.name, "bench.json")
        result = subprocess.run(
            [sys.executable, "-m", "caps.bench", "--json", out, *args],
            capture_output=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        with open(out) as f:
            return result.stdout.decode(), json.load(f)

    def test_throughput_smoke(self):
        """The relay and every store run, and each row reports the figures the docs quote."""
        text, rows = self.run_bench("--messages", "3000", "--window", "100")
        self.assertEqual(
            [r["store"] for r in rows],
            ["relay", "memory", "memory-no-event-log", "sqlite-full", "sqlite-normal"],
        )
        # The relay is the floor the others are compared with.
        self.assertEqual(rows[0].get("cpu_vs_relay", 1.0), 1.0)
        for row in rows:
            self.assertEqual(row["messages"], 3000)
            for key in ("msgs_per_s", "confirm_ms_p99"):
                self.assertGreater(row[key], 0, row)
            self.assertGreaterEqual(row["broker_cpu_us_per_msg"], 0)
        self.assertIn("broker_cpu_us_per_msg", text)

    def test_stall_smoke(self):
        """The stall run compares the writer thread with commits on the reactor."""
        _, rows = self.run_bench("--stall", "--messages", "2000")
        self.assertEqual([r["writer"] for r in rows], ["thread", "reactor"])
        self.assertEqual({r["messages"] for r in rows}, {2000})
