"""
Three real broker processes sharing one Redis (C{--shared}): one is
killed with SIGKILL while a publisher streams confirmed messages at it and
a consumer on it holds messages unacknowledged; the publisher goes on
through another broker, as the apps do; consumers on a third receive every
confirmed message, in per-queue order apart from redeliveries.
"""

import json
import random
import select
import socket
import time
from unittest import skipIf

from twisted.trial.unittest import SynchronousTestCase

from . import redisserver
from .processes import RunningBroker, send
from .test_crash import QUEUES, Publisher

MESSAGES = 1500
# A broker's messages come back once its heartbeat lapses (5 s): the
# consumers wait this long at most for the last ones.
DRAIN_SECONDS = 60.0


class Consumer:
    """
    A connection subscribed to every test queue, acknowledging (or, as a
    holder, keeping) what it gets: C{got} is each queue's C{(n,
    redelivered)}, in arrival order.
    """

    def __init__(self, broker, prefetch, acks=True):
        self.sock = socket.create_connection(broker.address, timeout=10)
        self.acks = acks
        self.buffer = b""
        self.got = {q: [] for q in range(QUEUES)}
        for q in range(QUEUES):
            send(
                self.sock,
                {
                    "event": "subscribe",
                    "id": q,
                    "payload": {
                        "clientId": f"q{q}",
                        "event": "e",
                        "prefetch": prefetch,
                    },
                },
            )

    def read(self, timeout):
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        data = self.sock.recv(65536)
        if not data:
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        acks = []
        for line in lines:
            frame = json.loads(line)
            if frame["event"] != "e":
                continue
            q = int(frame["clientId"][1:])
            self.got[q].append((frame["payload"]["n"], frame["redelivered"]))
            if self.acks:
                acks.append(
                    json.dumps(
                        {
                            "event": "received",
                            "payload": {
                                "clientId": frame["clientId"],
                                "event": "e",
                                "messageId": frame["messageId"],
                            },
                        }
                    ).encode()
                    + b"\n"
                )
        if acks:
            self.sock.sendall(b"".join(acks))

    def delivered(self):
        """
        The messages every queue has had (each queue is subscribed to the
        event, so every message is routed to all of them).
        """
        return set.intersection(*({n for n, _ in got} for got in self.got.values()))

    def close(self):
        self.sock.close()


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SharedCrashTests(SynchronousTestCase):
    def setUp(self):
        self.server = redisserver.shared()
        with self.server.client() as client:
            client.flushall()
        self.brokers = []

    def start_broker(self):
        broker = RunningBroker(self.server.url, "--shared", "--no-event-log")
        self.addCleanup(broker.stop)
        return broker

    def test_sigkill_of_one_broker_loses_nothing_confirmed(self):
        """
        Killed mid-stream, one of three brokers loses no confirmed message:
        the survivors deliver every one, those it held included, in order
        per queue apart from redeliveries.
        """
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        doomed, second, third = (self.start_broker() for _ in range(3))
        consumer = Consumer(third, prefetch=50)
        holder = Consumer(doomed, prefetch=20, acks=False)
        self.addCleanup(consumer.close)
        self.addCleanup(holder.close)
        confirmed = set()
        publisher = Publisher(doomed.address, confirmed)
        half = MESSAGES // 2
        publisher.send(range(half))
        kill_after = rng.randint(half // 4, half // 2)
        for _ in range(600):
            if len(confirmed) >= kill_after or not publisher.read(0.05):
                break
            holder.read(0)
            consumer.read(0)
        holder.read(0.1)
        held = holder.delivered()
        doomed.kill()
        for _ in range(100):
            if not publisher.read(1.0):
                break
        publisher.close()
        # The rest, and what was not confirmed again (same messageIds),
        # through another broker.
        publisher = Publisher(second.address, confirmed)
        rest = [n for n in range(half) if n not in confirmed] + list(
            range(half, MESSAGES)
        )
        publisher.send(rest)
        publisher.wait_answers(rest)
        self.assertEqual(publisher.errors(), {}, f"seed {seed}")
        publisher.close()
        self.assertEqual(len(confirmed), MESSAGES, f"seed {seed}")
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline and not confirmed <= consumer.delivered():
            consumer.read(0.1)
        missing = confirmed - consumer.delivered()
        self.assertEqual(missing, set(), f"seed {seed}: {len(missing)} missing")
        self.assertTrue(held, "the killed broker's consumer held nothing")
        self.assertTrue(held <= consumer.delivered())
        for q, got in consumer.got.items():
            first = [n for n, redelivered in got if not redelivered]
            self.assertEqual(first, sorted(first), f"seed {seed}: queue q{q}")
            self.assertEqual({n for n, _ in got}, set(range(MESSAGES)))
