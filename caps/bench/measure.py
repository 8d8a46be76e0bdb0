"""
How each part of C{python -m caps.bench} is measured, on a broker (or
relay) that is running: C{start(target, *args)} starts a client process
of L{caps.bench.load} against it.  What the figures mean is in
L{caps.bench}'s documentation.
"""

from caps.bench import load
from caps.bench.broker import cpu_seconds, rss_bytes
from caps.bench.report import percentile

MB = 1024 * 1024


def allowed(messages):
    """
    Seconds the benchmark waits for a client that handles C{messages}:
    the clients themselves give up after 60 s without progress.
    """
    return 120 + messages / 100


def measure_throughput(broker, start, messages, window):
    """
    End-to-end msgs/s and the broker's CPU per message, with one producer
    (at most C{window} unconfirmed) and one consumer acknowledging all.
    """
    consumer = start(load.consumer, messages)
    consumer.expect("ready")
    producer = start(load.producer, messages, window)
    producer.expect("ready")
    cpu = cpu_seconds(broker.pid)
    store_cpu = _store_cpu(broker)
    producer.send("go")
    sent = producer.expect("done", allowed(messages))
    got = consumer.expect("done", allowed(messages))
    cpu = cpu_seconds(broker.pid) - cpu
    seconds = (got["end"] - sent["start"]) / 1e9
    return {
        "messages": messages,
        "seconds": seconds,
        "msgs_per_s": messages / seconds,
        "broker_cpu_us_per_msg": cpu / messages * 1e6,
        "store_cpu_us_per_msg": _per_message(broker, store_cpu, messages),
    }


def _store_cpu(broker):
    """
    CPU time of the broker's store server so far (Redis), or L{None}.
    """
    return cpu_seconds(broker.store_pid) if broker.store_pid else None


def _per_message(broker, before, messages):
    """
    The store server's CPU µs per message since C{before}, or L{None}.
    """
    if before is None:
        return None
    return (cpu_seconds(broker.store_pid) - before) / messages * 1e6


def measure_latency(broker, start, messages, rate):
    """
    Publish-to-delivery and publish-to-confirmation percentiles at a
    steady C{rate}; the row, and the sorted latencies (ns) for the chart.
    """
    consumer = start(load.consumer, messages, True)
    consumer.expect("ready")
    producer = start(load.paced_producer, messages, rate)
    producer.expect("ready")
    producer.send("go")
    sent = producer.expect("done", allowed(messages) + messages / rate)
    got = consumer.expect("done", allowed(messages))
    latencies = sorted(got["latency_ns"])
    confirms = sorted(sent["confirm_ns"])
    row = {"rate": rate, "messages": messages}
    for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999)):
        row[name + "_ms"] = percentile(latencies, fraction) / 1e6
    row["max_ms"] = latencies[-1] / 1e6
    row["confirm_p50_ms"] = percentile(confirms, 0.5) / 1e6
    row["confirm_p99_ms"] = percentile(confirms, 0.99) / 1e6
    sending = (sent["last_sent"] - sent["start"]) / 1e9
    row["achieved_rate"] = (messages - 1) / sending if sending > 0 else None
    return row, latencies


def measure_drain(broker, start, backlog, window):
    """
    Queue C{backlog} messages with nobody consuming, then drain them: the
    publish and drain rates, and resident memory per queued message.
    """
    producer = start(load.producer, backlog, window)
    producer.expect("ready")
    rss_before = rss_bytes(broker.pid)
    producer.send("go")
    sent = producer.expect("done", allowed(backlog))
    rss_queued = rss_bytes(broker.pid)
    consumer = start(load.consumer, backlog, False, True)
    consumer.expect("ready")
    cpu = cpu_seconds(broker.pid)
    store_cpu = _store_cpu(broker)
    consumer.send("go")
    got = consumer.expect("done", allowed(backlog))
    cpu = cpu_seconds(broker.pid) - cpu
    return {
        "backlog": backlog,
        "publish_msgs_per_s": backlog / ((sent["end"] - sent["start"]) / 1e9),
        "drain_msgs_per_s": backlog / ((got["end"] - got["start"]) / 1e9),
        "drain_cpu_us_per_msg": cpu / backlog * 1e6,
        "drain_store_cpu_us_per_msg": _per_message(broker, store_cpu, backlog),
        "rss_before_mb": rss_before / MB,
        "rss_queued_mb": rss_queued / MB,
        "bytes_per_queued_msg": (rss_queued - rss_before) / backlog,
    }


def measure_connections(broker, start, count):
    """
    Resident memory per idle subscribed connection, C{count} of them.
    """
    holder = start(load.idle_connections, count)
    holder.expect("ready")
    rss_before = rss_bytes(broker.pid)
    holder.send("go")
    opened = holder.expect("opened", allowed(count))
    rss_open = rss_bytes(broker.pid)
    holder.send("close")
    holder.expect("done")
    return {
        "connections": count,
        "seconds_to_open": opened["seconds"],
        "rss_before_mb": rss_before / MB,
        "rss_open_mb": rss_open / MB,
        "bytes_per_connection": (rss_open - rss_before) / count,
    }


def no_drain(backlog):
    """
    The catch-up row of a relay, which keeps nothing to catch up on.
    """
    return {
        "backlog": backlog,
        "publish_msgs_per_s": None,
        "drain_msgs_per_s": None,
        "drain_cpu_us_per_msg": None,
        "drain_store_cpu_us_per_msg": None,
        "rss_before_mb": None,
        "rss_queued_mb": None,
        "bytes_per_queued_msg": None,
    }
