"""
How each part of C{python -m caps.bench} is measured, on the brokers (or
the relay) of one store, running: C{brokers} is a list of them (one, or
several sharing a Redis), and C{start(target, *args, via=i)} starts a
client process of L{caps.bench.load} against broker C{i} (the first if
not given).  What the figures mean is in L{caps.bench}'s documentation.
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


def split(total, parts):
    """
    C{total} messages over C{parts} producers: as even as can be, the
    first ones one more each while the remainder lasts.
    """
    each, rest = divmod(total, parts)
    return [each + (i < rest) for i in range(parts)]


def measure_throughput(brokers, start, messages, window, queues=(load.QUEUE,)):
    """
    End-to-end msgs/s and the brokers' CPU per message, with a producer
    (at most C{window} unconfirmed) and a consumer acknowledging all for
    each of C{queues}, all at once: the C{messages} are split over them.
    Pair C{i} publishes through broker C{i} and consumes through the next
    one (modulo their number), so that with several brokers every message
    crosses from one to another.
    """
    n = len(brokers)
    pairs = [
        (i, queue, count)
        for i, (queue, count) in enumerate(
            zip(queues, split(messages, len(queues)), strict=True)
        )
        if count
    ]
    consumers = [
        (start(load.consumer, count, False, False, queue, via=(i + 1) % n), count)
        for i, queue, count in pairs
    ]
    for consumer, _ in consumers:
        consumer.expect("ready")
    producers = [
        (start(load.producer, count, window, queue, via=i % n), count)
        for i, queue, count in pairs
    ]
    for producer, _ in producers:
        producer.expect("ready")
    cpu = _cpu(brokers)
    store_cpu = _store_cpu(brokers)
    for producer, _ in producers:
        producer.send("go")
    sent = [producer.expect("done", allowed(count)) for producer, count in producers]
    got = [consumer.expect("done", allowed(count)) for consumer, count in consumers]
    cpu = _cpu(brokers) - cpu
    seconds = (max(g["end"] for g in got) - min(s["start"] for s in sent)) / 1e9
    return {
        "messages": messages,
        "seconds": seconds,
        "msgs_per_s": messages / seconds,
        "broker_cpu_us_per_msg": cpu / messages * 1e6,
        "store_cpu_us_per_msg": _per_message(brokers, store_cpu, messages),
    }


def _cpu(brokers):
    """
    CPU time of all the C{brokers} so far, together.
    """
    return sum(cpu_seconds(broker.pid) for broker in brokers)


def _rss(brokers):
    """
    Resident memory of all the C{brokers} now, together.
    """
    return sum(rss_bytes(broker.pid) for broker in brokers)


def _store_cpu(brokers):
    """
    CPU time of the brokers' store server so far (Redis), or L{None}.
    """
    pid = brokers[0].store_pid
    return cpu_seconds(pid) if pid else None


def _per_message(brokers, before, messages):
    """
    The store server's CPU µs per message since C{before}, or L{None}.
    """
    if before is None:
        return None
    return (cpu_seconds(brokers[0].store_pid) - before) / messages * 1e6


def measure_latency(brokers, start, messages, rate):
    """
    Publish-to-delivery and publish-to-confirmation percentiles at a
    steady C{rate}, published through the first broker and consumed
    through the last; the row, and the sorted latencies (ns) for the
    chart.
    """
    consumer = start(load.consumer, messages, True, via=len(brokers) - 1)
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


def measure_drain(brokers, start, backlog, window):
    """
    Queue C{backlog} messages through the first broker with nobody
    consuming, then drain them through the last: the publish and drain
    rates, the brokers' CPU per message drained, and their resident
    memory (together) per queued message.
    """
    producer = start(load.producer, backlog, window)
    producer.expect("ready")
    rss_before = _rss(brokers)
    producer.send("go")
    sent = producer.expect("done", allowed(backlog))
    rss_queued = _rss(brokers)
    consumer = start(load.consumer, backlog, False, True, via=len(brokers) - 1)
    consumer.expect("ready")
    cpu = _cpu(brokers)
    store_cpu = _store_cpu(brokers)
    consumer.send("go")
    got = consumer.expect("done", allowed(backlog))
    cpu = _cpu(brokers) - cpu
    return {
        "backlog": backlog,
        "publish_msgs_per_s": backlog / ((sent["end"] - sent["start"]) / 1e9),
        "drain_msgs_per_s": backlog / ((got["end"] - got["start"]) / 1e9),
        "drain_cpu_us_per_msg": cpu / backlog * 1e6,
        "drain_store_cpu_us_per_msg": _per_message(brokers, store_cpu, backlog),
        "rss_before_mb": rss_before / MB,
        "rss_queued_mb": rss_queued / MB,
        "bytes_per_queued_msg": (rss_queued - rss_before) / backlog,
    }


def measure_connections(brokers, start, count):
    """
    Resident memory per idle subscribed connection, C{count} of them, all
    on the first broker.
    """
    broker = brokers[0]
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
