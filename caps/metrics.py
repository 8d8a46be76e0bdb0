"""
The broker's metrics in Prometheus' text format, for C{/metrics}.

A collector of our own reads the broker when Prometheus scrapes: the
running totals, one series per queue for each per-queue metric (labels
C{client_id} and C{event}, nothing per message or per connection, so the
series grow with the number of queues only), and the number of
connections.  The SQLite and Redis stores' commit times go into a
histogram as they happen.  Everything is registered in a L{CollectorRegistry} of this
module's own, not prometheus_client's global one.

prometheus_client's Twisted resource is a WSGI application run on the
reactor's thread pool, so the collector takes its snapshot of the broker
on the reactor thread (C{blockingCallFromThread}) and builds the answer
on the pool's thread.  docs/operations.md lists every metric.
"""

import attrs
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

QUEUE_LABELS = ("client_id", "event")

# Seconds; a group commit with synchronous=FULL is one fsync, from well
# under a millisecond (NVMe) to tens of milliseconds (a busy disk).
COMMIT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

# (name, the field of Totals, help)
TOTALS = (
    ("caps_messages_published_total", "published", "Messages accepted."),
    (
        "caps_messages_delivered_total",
        "delivered",
        "Deliveries to consumers, redeliveries included.",
    ),
    (
        "caps_messages_redelivered_total",
        "redelivered",
        "Deliveries of a message sent before (not acknowledged in time, "
        "nacked, or its consumer went away).",
    ),
    ("caps_messages_acknowledged_total", "acknowledged", "Messages acknowledged."),
    (
        "caps_messages_dead_lettered_total",
        "dead_lettered",
        "Messages moved to a dead-letter queue (too many deliveries, expired).",
    ),
)

# (name, kind, the field of a queue row, help)
QUEUE_METRICS = (
    (
        "caps_queue_depth",
        "gauge",
        "depth",
        "Messages in the queue, in flight included.",
    ),
    (
        "caps_queue_in_flight",
        "gauge",
        "inFlight",
        "Messages sent, not yet acknowledged.",
    ),
    (
        "caps_queue_dead_letters",
        "gauge",
        "deadLetters",
        "Messages in the queue's dead letters (<event>.dead).",
    ),
    ("caps_queue_consumers", "gauge", "consumers", "Consumers subscribed now."),
    (
        "caps_queue_subscribed",
        "gauge",
        "subscribed",
        "1 if the queue has a subscription (it gets matching messages), else 0.",
    ),
    (
        "caps_queue_oldest_age_seconds",
        "gauge",
        "oldestAge",
        "Age of the oldest message waiting to be sent; 0 if none waits.",
    ),
    (
        "caps_queue_published_total",
        "counter",
        "published",
        "Messages published into the queue since the broker started.",
    ),
    (
        "caps_queue_delivered_total",
        "counter",
        "delivered",
        "Deliveries from the queue since the broker started.",
    ),
)


@attrs.frozen
class Snapshot:
    """
    What one scrape reports, taken on the reactor thread.
    """

    totals: dict
    queues: list
    connections: int
    store_available: bool


def snapshot(broker):
    """
    Read the broker: its totals, its queue rows and its connections.
    """
    return Snapshot(
        totals=attrs.asdict(broker.monitor.totals),
        queues=broker.queue_rows(),
        connections=len(broker.client_rows()),
        store_available=bool(broker.store.available),
    )


def _direct(f):
    return f()


@attrs.define(eq=False)
class BrokerCollector:
    """
    A prometheus_client collector reading the broker at each scrape.

    @ivar call: runs a function where the broker may be read and returns
        its result: directly (tests, or a scrape on the reactor thread), or
        through C{blockingCallFromThread} from a thread pool.
    """

    broker: object
    call: object = _direct

    def collect(self):
        seen = self.call(lambda: snapshot(self.broker))
        for name, field, text in TOTALS:
            yield CounterMetricFamily(name, text, value=seen.totals[field])
        for name, kind, field, text in QUEUE_METRICS:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=QUEUE_LABELS
            )
            for row in seen.queues:
                # None (no oldest message) is 0; True (subscribed) is 1.
                family.add_metric(
                    (row["clientId"], row["event"]), float(row[field] or 0)
                )
            yield family
        yield GaugeMetricFamily(
            "caps_connections", "Client connections open.", value=seen.connections
        )
        yield GaugeMetricFamily(
            "caps_store_available",
            "1 if the store is writing; 0 while its writes fail (changes refused).",
            value=int(seen.store_available),
        )


def metrics_registry(broker, call=_direct):
    """
    A registry of the broker's metrics: its collector, and the store's
    commit histogram where the store reports its commits.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, call))
    observers = getattr(broker.store, "commit_observers", None)
    if observers is not None:
        commits = Histogram(
            "caps_store_commit_seconds",
            "Seconds each group commit of the store took (its sync included).",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        observers.append(commits.observe)
    return registry


def metrics_resource(broker, reactor):
    """
    The C{/metrics} resource: prometheus_client's Twisted resource over
    the broker's own registry, reading the broker on C{reactor}'s thread.
    """
    from prometheus_client.twisted import MetricsResource
    from twisted.internet.threads import blockingCallFromThread

    def on_reactor(f):
        return blockingCallFromThread(reactor, f)

    return MetricsResource(metrics_registry(broker, on_reactor))
