"""
A consumer that stops reading must not make the broker's memory grow: real
broker, real sockets.  The stuck consumer takes any number of messages
(prefetch 1,000,000), so only the transport's flow control stands between
its full socket and the broker's memory.

A module-level test, so pytest runs it and trial does not collect it: what
it measures is the transport's flow control, which the JSON codec trial
selects for the broker (CAPS_JSON=stdlib) does not touch; under trial the
same 200,000 publishes took 21 s (9 s on msgspec).
"""

import contextlib
import json
import socket
import threading

from caps.bench import publish

from .processes import RunningBroker

MESSAGES = 200_000
# Memory the stuck consumer may cost the broker beyond the queued messages
# themselves: its send buffer (Twisted pauses at 64 KiB) and the few
# hundred messages in flight to it, with a wide margin for the allocator.
BOUND = 16 * 1024 * 1024


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def subscribe(address, prefetch):
    sock = socket.create_connection(address, timeout=30)
    # A small receive buffer, so the broker's side fills up quickly.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = {
        "event": "subscribe",
        "id": 1,
        "payload": {"clientId": "bench", "event": "order", "prefetch": prefetch},
    }
    sock.sendall(json.dumps(request).encode() + b"\n")
    return sock


def run_broker(stuck, cleanups):
    # The publisher is a bulk loader: no frame rate limit for it.
    broker = RunningBroker(
        "memory", "--ack-timeout", "0", "--max-queue", "300000", "--max-rate", "0"
    )
    cleanups.callback(broker.stop)
    if stuck:
        sock = subscribe(broker.address, 1_000_000)
        cleanups.callback(sock.close)
    publish(broker.address, MESSAGES, 1000, [])
    # Other clients are still served: a ping comes back.
    sock, reader = broker.connect()
    cleanups.callback(sock.close)
    sock.sendall(b'{"event":"ping","id":"alive"}\n')
    assert json.loads(reader.readline())["event"] == "pong"
    return rss(broker.process.pid)


def test_stuck_consumer_costs_bounded_memory():
    """With 200,000 messages published, a consumer that never reads costs the broker less than 16 MB."""
    with contextlib.ExitStack() as cleanups:
        # Both runs at once: the machine has two cores.
        results = {}
        threads = [
            threading.Thread(
                target=lambda s=s: results.update({s: run_broker(s, cleanups)})
            )
            for s in (False, True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        without, with_stuck = results[False], results[True]
        print(
            f"broker memory after {MESSAGES:,} messages: {without / 2**20:.1f} MB "
            f"with no consumer, {with_stuck / 2**20:.1f} MB with one that never reads"
        )
        assert with_stuck - without < BOUND
