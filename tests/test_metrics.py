"""
The Prometheus metrics: what the collector reports for a broker in memory
driven with a fake clock, and the SQLite store's commit histogram.
"""

import os
import sqlite3
import tempfile
import urllib.request
from unittest import skipIf

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps.broker import Broker
from caps.frames import encode_json
from caps.metrics import BrokerCollector, metrics_registry, snapshot
from caps.store.group import RETRY_DELAY
from caps.store.redis import RedisStore
from caps.store.sqlite import SQLiteStore

from . import redisserver
from .helpers import RecordingConnection
from .processes import read, send
from .test_admin import web_broker
from .test_store import synchronous

START = 1_700_000_000


def scrape(registry):
    """
    The registry's text exposition, parsed: {family name: family}.
    """
    return scrape_text(generate_latest(registry).decode("utf-8"))


def scrape_text(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix=""):
    """
    A family's samples named C{family.name + suffix}: {labels tuple: value}.
    """
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in family.samples
        if s.name == family.name + suffix
    }


def value(families, name, suffix="", **labels):
    return samples(families[name], suffix)[tuple(sorted(labels.items()))]


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.broker = Broker(self.clock, ack_timeout=10, max_deliveries=2)
        self.addCleanup(self.broker.stop)

    def publish(self, event, payload, to=()):
        return self.broker.publish(event, payload, encode_json(payload), tuple(to))

    def deliveries(self):
        """
        A driver consuming (driver, pickup); acme-widgets' delivered queue
        unconsumed; three pickups sent, one acknowledged, two redelivered
        and then dead-lettered, one delivered left waiting.
        """
        driver = RecordingConnection("driver")
        self.broker.connect(driver)
        self.broker.subscribe(driver, "driver", "pickup")
        for n in range(3):
            self.publish("pickup", {"orderId": n}, to=["driver"])
        first, *_ = driver.take()
        self.broker.received("driver", "pickup", first["messageId"])
        self.clock.advance(10)  # two come back, sent a second time
        self.clock.advance(10)  # back again: dead letters after 2 deliveries
        self.publish("delivered", {"orderId": 0}, to=["acme-widgets"])
        self.clock.advance(7)
        return driver

    def test_empty_broker(self):
        """A broker with nothing done reports every total as 0, no queue series and no connections."""
        families = scrape(metrics_registry(self.broker))
        for name in (
            "caps_messages_published",
            "caps_messages_delivered",
            "caps_messages_redelivered",
            "caps_messages_acknowledged",
            "caps_messages_dead_lettered",
        ):
            self.assertEqual(families[name].type, "counter")
            self.assertEqual(value(families, name, "_total"), 0)
        self.assertEqual(families["caps_queue_depth"].samples, [])
        self.assertEqual(value(families, "caps_connections"), 0)
        self.assertEqual(value(families, "caps_store_available"), 1)
        # The memory store has no commits to time.
        self.assertNotIn("caps_store_commit_seconds", families)

    def test_totals(self):
        """The message counters follow the broker's running totals after publishes, deliveries, acks and dead letters."""
        self.deliveries()
        families = scrape(metrics_registry(self.broker))
        self.assertEqual(
            {
                name: value(families, name, "_total")
                for name in (
                    "caps_messages_published",
                    "caps_messages_delivered",
                    "caps_messages_redelivered",
                    "caps_messages_acknowledged",
                    "caps_messages_dead_lettered",
                )
            },
            {
                "caps_messages_published": 4,
                "caps_messages_delivered": 5,
                "caps_messages_redelivered": 2,
                "caps_messages_acknowledged": 1,
                "caps_messages_dead_lettered": 2,
            },
        )
        self.assertEqual(value(families, "caps_connections"), 1)

    def test_queues(self):
        """Each queue has one series per metric, labelled by client_id and event, with its depth, in flight, dead letters, consumers, oldest age and counters."""
        driver = self.deliveries()
        driver.take()
        # One more pickup, in flight now.
        self.publish("pickup", {"orderId": 3}, to=["driver"])
        self.assertEqual(len(driver.take()), 1)
        families = scrape(metrics_registry(self.broker))
        pickup = {"client_id": "driver", "event": "pickup"}
        dead = {"client_id": "driver", "event": "pickup.dead"}
        acme = {"client_id": "acme-widgets", "event": "delivered"}
        self.assertEqual(
            samples(families["caps_queue_depth"]),
            {
                tuple(sorted(acme.items())): 1,
                tuple(sorted(pickup.items())): 1,
                tuple(sorted(dead.items())): 2,
            },
        )
        self.assertEqual(value(families, "caps_queue_in_flight", **pickup), 1)
        self.assertEqual(value(families, "caps_queue_in_flight", **acme), 0)
        self.assertEqual(value(families, "caps_queue_dead_letters", **pickup), 2)
        self.assertEqual(value(families, "caps_queue_dead_letters", **acme), 0)
        self.assertEqual(value(families, "caps_queue_consumers", **pickup), 1)
        self.assertEqual(value(families, "caps_queue_consumers", **acme), 0)
        self.assertEqual(value(families, "caps_queue_subscribed", **pickup), 1)
        self.assertEqual(value(families, "caps_queue_subscribed", **acme), 0)
        # Waiting 7 s; nothing waits in the pickup queue (in flight only).
        self.assertEqual(value(families, "caps_queue_oldest_age_seconds", **acme), 7)
        self.assertEqual(value(families, "caps_queue_oldest_age_seconds", **pickup), 0)
        self.assertEqual(families["caps_queue_published"].type, "counter")
        self.assertEqual(value(families, "caps_queue_published", "_total", **pickup), 4)
        self.assertEqual(value(families, "caps_queue_published", "_total", **acme), 1)
        self.assertEqual(value(families, "caps_queue_delivered", "_total", **pickup), 6)
        self.assertEqual(value(families, "caps_queue_delivered", "_total", **acme), 0)
        self.assertEqual(families["caps_queue_depth"].type, "gauge")

    def test_read_at_scrape_time(self):
        """One registry reports the broker as it is at each scrape, and a deleted queue's series go away."""
        registry = metrics_registry(self.broker)
        self.assertEqual(scrape(registry)["caps_queue_depth"].samples, [])
        self.publish("pickup", {"orderId": 1}, to=["driver"])
        families = scrape(registry)
        self.assertEqual(
            value(families, "caps_queue_depth", client_id="driver", event="pickup"), 1
        )
        self.assertEqual(value(families, "caps_messages_published", "_total"), 1)
        conn = RecordingConnection()
        self.broker.connect(conn)
        self.broker.unsubscribe(conn, "driver", "pickup", delete=True)
        self.assertEqual(scrape(registry)["caps_queue_depth"].samples, [])

    def test_labels_escaped(self):
        """A clientId or event with quotes, backslashes or newlines is one well-formed series."""
        client_id = 'a"b\\c\nd'
        self.publish("ev ent", {}, to=[client_id])
        families = scrape(metrics_registry(self.broker))
        self.assertEqual(
            samples(families["caps_queue_depth"]),
            {(("client_id", client_id), ("event", "ev ent")): 1},
        )

    def test_snapshot_through_call(self):
        """The collector reads the broker only inside its call function, once per scrape."""
        calls = []

        def call(f):
            calls.append(f)
            return f()

        self.publish("pickup", {}, to=["driver"])
        collected = list(BrokerCollector(self.broker, call).collect())
        self.assertEqual(len(calls), 1)
        self.assertEqual(snapshot(self.broker).queues, self.broker.queue_rows())
        self.assertIn("caps_queue_depth", [f.name for f in collected])


class CommitHistogramTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.store = self.open_store()
        self.broker = Broker(self.clock, store=self.store)

    def open_store(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-metrics-")
        self.addCleanup(scratch.cleanup)
        return SQLiteStore.open(
            os.path.join(scratch.name, "caps.sqlite3"), self.clock, runner=synchronous
        )

    def tearDown(self):
        self.broker.stop()
        self.successResultOf(self.store.close())

    def test_commits_observed(self):
        """Each group commit of the store adds one sample of its duration to caps_store_commit_seconds."""
        registry = metrics_registry(self.broker)
        families = scrape(registry)
        self.assertEqual(families["caps_store_commit_seconds"].type, "histogram")
        self.assertEqual(value(families, "caps_store_commit_seconds", "_count"), 0)
        for _ in range(3):
            self.broker.publish("pickup", {}, b"{}", ("driver",))
            self.clock.advance(0)  # one pass of the reactor: one commit
        families = scrape(registry)
        count = value(families, "caps_store_commit_seconds", "_count")
        self.assertEqual(count, 3)
        self.assertGreater(value(families, "caps_store_commit_seconds", "_sum"), 0)
        buckets = samples(families["caps_store_commit_seconds"], "_bucket")
        self.assertEqual(buckets[(("le", "+Inf"),)], count)
        ordered = sorted(buckets.items(), key=lambda kv: float(kv[0][0][1]))
        counts = [c for _, c in ordered]
        self.assertEqual(counts, sorted(counts))

    def test_observers_told_after_commit(self):
        """The store tells its commit observers the seconds each written batch took, once it is written."""
        seen = []
        self.store.commit_observers.append(seen.append)
        self.broker.publish("pickup", {}, b"{}", ("driver",))
        self.assertEqual(seen, [])
        self.clock.advance(0)
        self.assertEqual(len(seen), 1)
        self.assertIsInstance(seen[0], float)
        self.assertGreaterEqual(seen[0], 0)

    def test_store_unavailable(self):
        """caps_store_available is 0 while the store's writes fail, and 1 again once one succeeds."""
        registry = metrics_registry(self.broker)
        self.store._runner = lambda f, *args: defer.fail(
            sqlite3.OperationalError("disk I/O error")
        )
        self.broker.publish("pickup", {}, b"{}", ("driver",))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        families = scrape(registry)
        self.assertEqual(value(families, "caps_store_available"), 0)
        self.assertEqual(value(families, "caps_store_commit_seconds", "_count"), 0)
        self.store._runner = synchronous
        self.clock.advance(RETRY_DELAY)
        families = scrape(registry)
        self.assertEqual(value(families, "caps_store_available"), 1)
        self.assertEqual(value(families, "caps_store_commit_seconds", "_count"), 1)

    def test_failing_observer_logged(self):
        """An observer that raises is logged and does not stop the commit's waiters or the other observers."""
        seen = []

        def broken(seconds):
            raise ValueError("broken")

        self.store.commit_observers.extend([broken, seen.append])
        self.broker.publish("pickup", {}, b"{}", ("driver",))
        waiting = self.store.flushed()
        self.clock.advance(0)
        self.successResultOf(waiting)
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisCommitHistogramTests(CommitHistogramTests):
    """
    The same with the Redis store: its commits are MULTI/EXEC transactions.
    """

    def open_store(self):
        server = redisserver.shared()
        server.client().flushall()
        return RedisStore.open(server.url, self.clock, runner=synchronous)


class RealMetricsTests(SynchronousTestCase):
    def test_scrape_sqlite_broker(self):
        """A real broker on SQLite with --web serves /metrics with its totals and the commits it made, read off the reactor thread."""
        scratch = tempfile.TemporaryDirectory(prefix="caps-metrics-")
        self.addCleanup(scratch.cleanup)
        store = "sqlite:" + os.path.join(scratch.name, "caps.sqlite3")
        broker, url = web_broker(self, store)
        vendor, vendor_in = broker.connect()
        self.addCleanup(vendor.close)
        for n in range(3):
            send(
                vendor,
                {"event": "pickup", "to": "driver", "id": n, "payload": {"n": n}},
            )
            self.assertEqual(read(vendor_in)["event"], "ok")
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            self.assertTrue(
                response.headers["Content-Type"].startswith("text/plain"),
                response.headers["Content-Type"],
            )
            families = scrape_text(response.read().decode("utf-8"))
        self.assertEqual(value(families, "caps_messages_published", "_total"), 3)
        self.assertEqual(
            value(families, "caps_queue_depth", client_id="driver", event="pickup"), 3
        )
        self.assertEqual(value(families, "caps_connections"), 1)
        # Each ok is sent once its commit is done: 3 commits at least.
        self.assertGreaterEqual(
            value(families, "caps_store_commit_seconds", "_count"), 3
        )
