"""
The durability promise, tested the hard way: a real broker, killed with
SIGKILL at random moments while a publisher streams confirmed messages at
it, restarted each time; at the end every queue is drained and checked.
The same test runs on an SQLite store and on a Redis store (a redis-server
of the test's own, which outlives the broker); and, on Redis, another kills
the Redis server under a running broker instead.
"""

import json
import os
import random
import re
import select
import socket
import tempfile
from unittest import skipIf

from twisted.trial.unittest import SynchronousTestCase

from caps.store.redis import LOCK_KEY

from . import redisserver
from .processes import RunningBroker

MESSAGES = 3000
QUEUES = 3
KILLS = 5
# Redis killed under a running broker: how many times, and how many
# publishes are sent while it is down.
REDIS_KILLS = 3
REDIS_MESSAGES = 2000
OUTAGE_PUBLISHES = 20
# Attempts of select(..., 0.1) while waiting for answers: 60 s at most.
WAIT_READS = 600
UNAVAILABLE = "store-unavailable"
WRITABLE_AGAIN = "is writable again"


def frame(n):
    return (
        json.dumps(
            {
                "event": "e",
                "to": f"q{n % QUEUES}",
                "id": n,
                "messageId": f"m{n}",
                "payload": {"n": n},
            }
        ).encode()
        + b"\n"
    )


class Publisher:
    """
    Streams publishes without waiting for each answer, and collects the
    answers that arrive: the messages the broker confirmed, and the last
    answer to each message (C{"ok"} or an error's code).
    """

    def __init__(self, address, confirmed):
        self.sock = socket.create_connection(address, timeout=10)
        self.confirmed = confirmed
        self.answers = {}
        self.buffer = b""

    def send(self, ns):
        self.sock.sendall(b"".join(frame(n) for n in ns))

    def read(self, timeout):
        """
        Take what has arrived; wait up to C{timeout} for more.  Returns
        False once the broker closed the connection.
        """
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return True
        try:
            data = self.sock.recv(65536)
        except ConnectionError:
            return False
        if not data:
            return False
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            reply = json.loads(line)
            if reply["event"] == "ok":
                self.confirmed.add(reply["id"])
                self.answers[reply["id"]] = "ok"
            else:
                assert reply["event"] == "error", reply
                self.answers[reply["id"]] = reply["payload"]["code"]
        return True

    def wait_answers(self, ns):
        """
        Read until every one of C{ns} is answered (or 60 s have passed, or
        the broker closed the connection).
        """
        for _ in range(WAIT_READS):
            if all(n in self.answers for n in ns) or not self.read(0.1):
                break

    def errors(self):
        return {n: code for n, code in self.answers.items() if code != "ok"}

    def close(self):
        self.sock.close()


def drain(broker):
    """
    Every message of each queue, by getAll: C{{q: [n, ...]}}, in the order
    the broker sent them.  getAll does not acknowledge: they stay.
    """
    sock, reader = broker.connect()
    delivered = {}
    try:
        for q in range(QUEUES):
            sock.sendall(
                json.dumps(
                    {"event": "getAll", "payload": {"clientId": f"q{q}", "event": "e"}}
                ).encode()
                + b"\n"
            )
            ns = []
            while True:
                reply = json.loads(reader.readline())
                if reply["event"] == "ok":
                    break
                ns.append(reply["payload"]["n"])
            delivered[q] = ns
    finally:
        reader.close()
        sock.close()
    return delivered


class _Crashes:
    """
    The crash tests, mixed into one TestCase per store: C{open_store()}
    gives the broker's C{--store}, C{died()} is called after each SIGKILL
    of the broker, before the next one starts on the store.
    """

    def setUp(self):
        self.store = self.open_store()

    def died(self):
        pass

    def start_broker(self, *args):
        broker = RunningBroker(self.store, *args)
        self.addCleanup(broker.stop)
        return broker

    def check(self, confirmed, delivered, total, seed, what):
        """
        Every confirmed message was delivered, in order, once; nothing
        that was never sent; each from its own queue.
        """
        everything = [n for ns in delivered.values() for n in ns]
        lost = confirmed - set(everything)
        unknown = set(everything) - set(range(total))
        duplicates = len(everything) - len(set(everything))
        print(
            f"{what} (seed {seed}): confirmed {len(confirmed)},"
            f" delivered {len(everything)}, lost {len(lost)}, duplicates {duplicates}"
        )
        self.assertEqual(lost, set(), f"{what}, seed {seed}")
        self.assertEqual(unknown, set(), f"{what}, seed {seed}")
        self.assertEqual(duplicates, 0, f"{what}, seed {seed}")
        for q, ns in delivered.items():
            self.assertEqual(ns, sorted(ns), f"{what}: q{q} out of order, seed {seed}")
            self.assertEqual({n % QUEUES for n in ns}, {q})

    def test_sigkill_loses_nothing_confirmed(self):
        """Killed five times mid-stream, the broker delivers every confirmed message, in order, and nothing else."""
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        confirmed = set()
        errors = {}
        next_new = 0
        for round in range(KILLS + 1):
            broker = self.start_broker()
            publisher = Publisher(broker.address, confirmed)
            # What was not confirmed is sent again first, with the same
            # messageId, as CapsClient does after a reconnect.
            pending = [n for n in range(next_new) if n not in confirmed]
            last = round == KILLS
            new = MESSAGES - next_new if last else rng.randint(100, 600)
            stream = pending + list(range(next_new, next_new + new))
            next_new += new
            publisher.send(stream)
            if last:
                for _ in range(WAIT_READS):
                    if len(confirmed) == MESSAGES or not publisher.read(0.1):
                        break
                errors.update(publisher.errors())
                self.assertEqual(errors, {}, f"seed {seed}")
                self.assertEqual(len(confirmed), MESSAGES, f"seed {seed}")
                publisher.close()
                broker.stop()
                break
            # Kill it as soon as a random number of the answers are in: the
            # moment when a broker that answered before syncing would have
            # answers out for changes still on their way to disk.
            kill_after = len(confirmed) + rng.randint(1, len(stream) // 2)
            for _ in range(WAIT_READS):
                if len(confirmed) >= kill_after or not publisher.read(0.05):
                    break
            broker.kill()
            self.died()
            # Answers written before the kill still count: read to the end.
            for _ in range(100):
                if not publisher.read(1.0):
                    break
            errors.update(publisher.errors())
            publisher.close()

        broker = self.start_broker()
        delivered = drain(broker)
        self.check(confirmed, delivered, MESSAGES, seed, f"crash test, {KILLS} kills")


class CrashTests(_Crashes, SynchronousTestCase):
    def open_store(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-crash-")
        self.addCleanup(scratch.cleanup)
        return "sqlite:" + os.path.join(scratch.name, "caps.sqlite3")


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisCrashTests(_Crashes, SynchronousTestCase):
    """
    On a redis-server of the test's own (append-only file, fsynced at every
    write), which outlives the broker.
    """

    def open_store(self):
        self.redis = redisserver.RedisServer()
        self.addCleanup(self.redis.stop)
        self.redis.start()
        self.client = self.redis.client()
        self.addCleanup(self.client.close)
        return self.redis.url

    def died(self):
        # The lock of the killed broker would expire within LOCK_TTL: the
        # next broker need not wait for that.
        self.client.delete(LOCK_KEY)

    def wait_writable(self, broker, times):
        """
        Wait until the broker has logged C{times} recoveries of its store.
        """
        broker.wait_for(re.compile(f"(?s)({re.escape(WRITABLE_AGAIN)}.*){{{times}}}"))

    def test_redis_sigkill_loses_nothing_confirmed(self):
        """Redis killed three times under a running broker: while it is down publishes are refused with store-unavailable, never confirmed, and once it is back every confirmed message is delivered, by that broker and by the next."""
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        broker = self.start_broker("--redis-durable")
        publisher = Publisher(broker.address, set())
        self.addCleanup(publisher.close)
        confirmed = publisher.confirmed
        next_new = 0
        for round in range(REDIS_KILLS + 1):
            pending = [n for n in range(next_new) if n not in confirmed]
            last = round == REDIS_KILLS
            new = REDIS_MESSAGES - next_new if last else rng.randint(100, 400)
            stream = pending + list(range(next_new, next_new + new))
            next_new += new
            publisher.send(stream)
            if last:
                publisher.wait_answers(stream)
                break
            kill_after = len(confirmed) + rng.randint(1, len(stream) // 2)
            for _ in range(WAIT_READS):
                if len(confirmed) >= kill_after or not publisher.read(0.05):
                    break
            self.redis.kill()
            # Published while Redis is down: each is refused, at once or
            # once the write that holds it fails.
            outage = list(range(next_new, next_new + OUTAGE_PUBLISHES))
            next_new += OUTAGE_PUBLISHES
            publisher.send(outage)
            publisher.wait_answers(stream + outage)
            answers = {publisher.answers.get(n) for n in outage}
            self.assertEqual(answers, {UNAVAILABLE}, f"seed {seed}")
            # Down for about a second, less than LOCK_TTL: the broker keeps
            # its lock (a longer outage: tests/test_redis_outage.py).
            self.redis.restart()
            # What was refused is sent again only once the broker writes
            # again: one sent again while the store recovers could be
            # refused again and land after a later one, out of order.
            self.wait_writable(broker, round + 1)

        self.assertEqual(len(confirmed), REDIS_MESSAGES, f"seed {seed}")
        self.assertEqual(
            set(publisher.errors().values()) - {UNAVAILABLE}, set(), f"seed {seed}"
        )
        what = f"Redis crash test, {REDIS_KILLS} kills"
        self.check(confirmed, drain(broker), REDIS_MESSAGES, seed, what)
        # What it delivered is in Redis: a new broker finds all of it.
        broker.kill()
        self.died()
        after = self.start_broker()
        self.check(confirmed, drain(after), REDIS_MESSAGES, seed, what + ", restarted")
