"""
The durability promise, tested the hard way: a real broker on an SQLite
store, killed with SIGKILL at random moments while a publisher streams
confirmed messages at it, restarted each time; at the end every queue is
drained and checked.
"""

import json
import os
import random
import select
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from .processes import RunningBroker

MESSAGES = 3000
QUEUES = 3
KILLS = 5


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
    answers that arrive: the messages the broker confirmed.
    """

    def __init__(self, address, confirmed):
        self.sock = socket.create_connection(address, timeout=10)
        self.confirmed = confirmed
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
            assert reply["event"] == "ok", reply
            self.confirmed.add(reply["id"])
        return True

    def close(self):
        self.sock.close()


class CrashTests(SynchronousTestCase):
    def test_sigkill_loses_nothing_confirmed(self):
        """Killed five times mid-stream, the broker delivers every confirmed message, in order, and nothing else."""
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        scratch = tempfile.TemporaryDirectory(prefix="caps-crash-")
        self.addCleanup(scratch.cleanup)
        store = "sqlite:" + os.path.join(scratch.name, "caps.sqlite3")
        confirmed = set()
        next_new = 0
        for round in range(KILLS + 1):
            broker = RunningBroker(store)
            self.addCleanup(broker.stop)
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
                for _ in range(600):
                    if len(confirmed) == MESSAGES or not publisher.read(0.1):
                        break
                self.assertEqual(len(confirmed), MESSAGES, f"seed {seed}")
                publisher.close()
                broker.stop()
                break
            # Kill it as soon as a random number of the answers are in: the
            # moment when a broker that answered before syncing would have
            # answers out for changes still on their way to disk.
            kill_after = len(confirmed) + rng.randint(1, len(stream) // 2)
            for _ in range(600):
                if len(confirmed) >= kill_after or not publisher.read(0.05):
                    break
            broker.kill()
            # Answers written before the kill still count: read to the end.
            for _ in range(100):
                if not publisher.read(1.0):
                    break
            publisher.close()

        broker = RunningBroker(store)
        self.addCleanup(broker.stop)
        sock, reader = broker.connect()
        self.addCleanup(sock.close)
        delivered = {}
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
        everything = [n for ns in delivered.values() for n in ns]
        lost = confirmed - set(everything)
        unknown = set(everything) - set(range(MESSAGES))
        duplicates = len(everything) - len(set(everything))
        print(
            f"crash test (seed {seed}): {KILLS} kills, confirmed {len(confirmed)},"
            f" delivered {len(everything)}, lost {len(lost)}, duplicates {duplicates}"
        )
        self.assertEqual(lost, set(), f"seed {seed}")
        self.assertEqual(unknown, set(), f"seed {seed}")
        self.assertEqual(duplicates, 0, f"seed {seed}")
        for q, ns in delivered.items():
            self.assertEqual(ns, sorted(ns), f"queue q{q} out of order, seed {seed}")
            self.assertEqual({n % QUEUES for n in ns}, {q})
