"""
A consumer that stops reading must not make the broker's memory grow: real
broker, real sockets.  The stuck consumer takes any number of messages
(prefetch 1,000,000), so only the transport's flow control stands between
its full socket and the broker's memory.
"""

import json
import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

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


class SlowConsumerTests(SynchronousTestCase):
    def run_broker(self, stuck):
        # The publisher is a bulk loader: no frame rate limit for it.
        broker = RunningBroker(
            "memory", "--ack-timeout", "0", "--max-queue", "300000", "--max-rate", "0"
        )
        self.addCleanup(broker.stop)
        if stuck:
            sock = subscribe(broker.address, 1_000_000)
            self.addCleanup(sock.close)
        publish(broker.address, MESSAGES, 1000, [])
        # Other clients are still served: a ping comes back.
        sock, reader = broker.connect()
        self.addCleanup(sock.close)
        sock.sendall(b'{"event":"ping","id":"alive"}\n')
        self.assertEqual(json.loads(reader.readline())["event"], "pong")
        return rss(broker.process.pid)

    def test_stuck_consumer_costs_bounded_memory(self):
        """With 200,000 messages published, a consumer that never reads costs the broker less than 16 MB."""
        # Both runs at once: the machine has two cores.
        results = {}
        threads = [
            threading.Thread(target=lambda s=s: results.update({s: self.run_broker(s)}))
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
        self.assertLess(with_stuck - without, BOUND)
