"""
Benchmarks: run them on your own machine.

    python -m caps.bench                      # each store, 20,000 messages
    python -m caps.bench --messages 50000 --store sqlite-full
    python -m caps.bench --stall              # what commits do to the reactor

The throughput run starts a real broker (twistd) on loopback for each
store, and first the bare relay (caps/relay.py), the floor each store's
CPU per message is compared with.  One connection publishes with up to --window unconfirmed messages
in flight; another consumes and acknowledges every message.  It reports
end-to-end messages per second, the broker's own CPU time per message
(publish, deliver and acknowledge, from /proc) and how long confirmations
took.  The load runs on the same machine as the broker: compare stores
measured in one run, not figures from different runs.

The stall run keeps a broker in this process on an SQLite store, publishes
into it in bursts from the reactor, and measures how late a 1 ms timer
fires: with the store's writer thread (how the broker runs) and with every
commit run on the reactor thread instead, for comparison.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

from twisted.python import usage

from caps.demo import LISTENING, broker_command
from caps.options import positive_int

# The bare relay first: every other row is compared with it.
RELAY = "relay"
STORES = {
    RELAY: (),
    "memory": ("--store", "memory"),
    "memory-no-event-log": ("--store", "memory", "--no-event-log"),
    "sqlite-full": ("--store", "sqlite:{dir}/bench.sqlite3", "--sync", "full"),
    "sqlite-normal": ("--store", "sqlite:{dir}/bench.sqlite3", "--sync", "normal"),
}
PAYLOAD = {
    "store": "acme-widgets",
    "orderId": "2f1c7e8a-6a0e-4c1e-9b3c-8d7e6f5a4b3c",
    "customer": "Margaret Hamilton",
    "address": "4421 Maple Dr, Portland, OR",
    "items": 3,
}
OK_ID = re.compile(rb'"id":(\d+)')


def cpu_seconds(pid):
    """
    User plus system CPU time of a process, from /proc (Linux).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def lines(sock):
    """
    The lines arriving on a socket, until it closes.
    """
    buffer = b""
    while data := sock.recv(1 << 16):
        buffer += data
        *complete, buffer = buffer.split(b"\n")
        yield from complete


class Broker:
    """
    A broker subprocess on a free loopback port, its log thrown away.
    """

    def __init__(self, args, relay=False):
        if relay:
            command = (sys.executable, "-m", "caps.relay")
        else:
            command = broker_command("--listen", "tcp:0:interface=127.0.0.1", *args)
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for raw in self.process.stdout:
            match = LISTENING.search(raw.decode("utf-8", "replace"))
            if match:
                host, port = match.group(1).rsplit(":", 1)
                self.address = (host, int(port))
                break
        else:
            raise RuntimeError("the broker did not start")
        # Keep reading its log, so that it never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def consume(address, messages, ready):
    """
    Consume and acknowledge C{messages} messages, in batches of writes.
    """
    sock = socket.create_connection(address)
    sock.sendall(
        b'{"event":"subscribe","id":0,"payload":{"clientId":"bench","event":"order"}}\n'
    )
    received = 0
    acks = []
    for line in lines(sock):
        if line.startswith(b'{"event":"ok"'):
            ready.set()
            continue
        message_id = json.loads(line)["messageId"]
        acks.append(
            b'{"event":"received","payload":{"clientId":"bench","event":"order",'
            b'"messageId":' + json.dumps(message_id).encode() + b"}}\n"
        )
        received += 1
        if len(acks) >= 100 or received == messages:
            sock.sendall(b"".join(acks))
            acks = []
        if received == messages:
            break
    # One more round trip: every acknowledgement before it was handled.
    sock.sendall(b'{"event":"ping","id":"end"}\n')
    for line in lines(sock):
        if b'"pong"' in line:
            break
    sock.close()


def publish(address, messages, window, latencies):
    """
    Publish C{messages} messages with at most C{window} unconfirmed.
    """
    sock = socket.create_connection(address)
    room = threading.Semaphore(window)
    sent_at = [0.0] * messages
    body = json.dumps(PAYLOAD).encode()

    def read_confirms():
        confirmed = 0
        for line in lines(sock):
            n = int(OK_ID.search(line).group(1))
            latencies.append(time.perf_counter() - sent_at[n])
            room.release()
            confirmed += 1
            if confirmed == messages:
                return

    reader = threading.Thread(target=read_confirms)
    reader.start()
    for n in range(messages):
        if not room.acquire(timeout=60):
            raise RuntimeError("no confirmation for 60 s: the broker is stuck")
        sent_at[n] = time.perf_counter()
        sock.sendall(
            b'{"event":"order","to":"bench","id":%d,"payload":%s}\n' % (n, body)
        )
    reader.join()
    sock.close()


def run_throughput(name, messages, window):
    """
    One store's run, on a broker of its own.
    """
    with tempfile.TemporaryDirectory(prefix="caps-bench-") as workdir:
        args = [a.format(dir=workdir) for a in STORES[name]]
        broker = Broker(args, relay=name == RELAY)
        try:
            ready = threading.Event()
            consumer = threading.Thread(
                target=consume, args=(broker.address, messages, ready)
            )
            consumer.start()
            ready.wait(30)
            latencies = []
            cpu_before = cpu_seconds(broker.process.pid)
            start = time.perf_counter()
            publish(broker.address, messages, window, latencies)
            consumer.join()
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(broker.process.pid) - cpu_before
        finally:
            broker.stop()
    return {
        "store": name,
        "messages": messages,
        "msgs_per_s": messages / elapsed,
        "broker_cpu_us_per_msg": cpu / messages * 1e6,
        "confirm_ms_p50": percentile(latencies, 0.50) * 1000,
        "confirm_ms_p99": percentile(latencies, 0.99) * 1000,
    }


def run_stall(bursts=1000, burst=100, threaded=True):
    """
    Publish C{bursts} bursts of C{burst} messages into an SQLite store on
    the real reactor, one burst per timer tick every millisecond, and
    measure how late each tick comes after the previous tick's own work
    was done: the time the reactor spent on anything else, the store's
    commits above all.
    """
    from twisted.internet import defer, reactor, task

    from caps.broker import Broker as CoreBroker
    from caps.frames import encode_json
    from caps.store.sqlite import SQLiteStore

    def inline(f, *args):
        return defer.maybeDeferred(f, *args)

    with tempfile.TemporaryDirectory(prefix="caps-stall-") as workdir:
        store = SQLiteStore.open(
            os.path.join(workdir, "stall.sqlite3"),
            reactor,
            runner=None if threaded else inline,
        )
        broker = CoreBroker(reactor, store=store)
        body = encode_json(PAYLOAD)
        lags = []
        last = [time.perf_counter()]
        remaining = [bursts]
        finished = defer.Deferred()

        def tick():
            lags.append(max(0.0, time.perf_counter() - last[0] - 0.001))
            if remaining[0]:
                remaining[0] -= 1
                for _ in range(burst):
                    broker.publish("order", PAYLOAD, body, ("bench",))
            elif store.flushed() is None:
                probe.stop()
                finished.callback(None)
            last[0] = time.perf_counter()

        probe = task.LoopingCall(tick)
        probe.start(0.001).addErrback(finished.errback)
        started = time.perf_counter()
        _run_until(reactor, finished)
        elapsed = time.perf_counter() - started
        _run_until(reactor, store.close())
    return {
        "writer": "thread" if threaded else "reactor",
        "messages": bursts * burst,
        "seconds": elapsed,
        "stall_ms_p50": percentile(lags, 0.5) * 1000,
        "stall_ms_p99": percentile(lags, 0.99) * 1000,
        "stall_ms_max": max(lags) * 1000,
    }


def _run_until(reactor, d):
    """
    Run the reactor until C{d} fires (the reactor is started once and
    stopped at the end of the process).
    """
    done = []
    d.addBoth(done.append)
    while not done:
        reactor.iterate(0.001)
    return done[0]


class Options(usage.Options):
    optFlags = [["stall", None, "Measure reactor stalls instead of throughput."]]
    optParameters = [
        [
            "messages",
            "n",
            None,
            "Messages per store (default 20,000; with --stall, 100,000).",
            positive_int,
        ],
        ["window", "w", 1000, "Unconfirmed publishes in flight.", positive_int],
        [
            "store",
            "s",
            None,
            "One store only: " + ", ".join(STORES) + " (default: all).",
        ],
        ["json", None, None, "Also write the results to this file as JSON."],
    ]

    def postOptions(self):
        if self["store"] is not None and self["store"] not in STORES:
            raise usage.UsageError(f"--store must be one of {', '.join(STORES)}")


def table(rows):
    keys = list(rows[0])
    cells = [
        [f"{row[k]:,.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        for row in rows
    ]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    out = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    out += [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    ]
    return "\n".join(out)


def main(argv):
    from caps import app

    options = app.parse(Options(), argv)
    if options["stall"]:
        bursts = max(1, (options["messages"] or 100_000) // 100)
        rows = [run_stall(bursts, threaded=True), run_stall(bursts, threaded=False)]
    else:
        names = [options["store"]] if options["store"] else list(STORES)
        rows = []
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            messages = options["messages"] or 20_000
            rows.append(run_throughput(name, messages, options["window"]))
        floor = next((r for r in rows if r["store"] == RELAY), None)
        if floor is not None and floor["broker_cpu_us_per_msg"] > 0:
            # CPU time is counted in clock ticks (10 ms): a tiny run of the
            # relay can show none at all.
            for row in rows:
                row["cpu_vs_relay"] = (
                    row["broker_cpu_us_per_msg"] / floor["broker_cpu_us_per_msg"]
                )
    print(table(rows))
    if options["json"]:
        with open(options["json"], "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
