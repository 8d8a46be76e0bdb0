"""
Real Redis servers for tests (L{caps.redisserver}).  Most tests share one
server per test process (L{shared}) and C{FLUSHALL} it in C{setUp}; the
few that kill or restart a server start their own.  When C{redis-server}
or redis-py is missing, L{AVAILABLE} is false and L{skip_reason} says why,
for C{skipIf}.
"""

import atexit
import os
import threading
import time

from caps.redisserver import AVAILABLE, HOST, RedisServer, free_port, skip_reason

__all__ = [
    "AVAILABLE",
    "HOST",
    "PRIMARY",
    "RedisServer",
    "aof_rewritten",
    "free_port",
    "shared",
    "skip_reason",
]

# Arguments for a server a test's replica will follow.  Redis 7 holds a
# replica's first full sync for repl-diskless-sync-delay (5 s by default)
# in case more replicas come to share the transfer; with one replica that
# is 5 s spent idle in replicated(), so it starts at once.
PRIMARY = ("--repl-diskless-sync-delay", "0")

_shared = None
_shared_lock = threading.Lock()


def shared():
    """
    The test process's shared server, started at the first call and stopped
    at exit.  Tests C{flushall()} it in C{setUp}.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            server = RedisServer()
            server.start()
            owner = os.getpid()
            # Not from a forked child that happens to run atexit handlers.
            atexit.register(lambda: os.getpid() == owner and server.stop())
            _shared = server
        elif not _shared.running:
            # Some test killed it: later tests still get a server.
            _shared.restart()
        return _shared


def replicated(primary, timeout=10.0):
    """
    Wait until a replica of C{primary} has everything the primary has: a
    write, then C{WAIT}, which Redis answers once a replica acknowledged it
    (or after C{timeout} seconds).  Returns how many replicas did.
    """
    with primary.client() as client:
        client.set("caps:test:replicated", 1)
        acknowledged = client.execute_command("WAIT", 1, int(timeout * 1000))
        client.delete("caps:test:replicated")
    return acknowledged


def aof_rewritten(server, timeout=10.0):
    """
    Wait until C{server} has no append-only file rewrite running or
    scheduled.  A replica rewrites its file right after its first full
    sync, and Redis refuses a SIGTERM until that is done ("Writing initial
    AOF, can't exit"), so stopping a replica stopped (SIGSTOP) before then
    costs L{caps.redisserver.STOP_TIMEOUT} and a SIGKILL.

    @raise AssertionError: if one is still running after C{timeout} s.
    """
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            info = client.info("persistence")
            if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"an AOF rewrite still runs after {timeout} s")
            time.sleep(0.01)


class SentinelEvents:
    """
    The events Sentinels publish on a channel (C{+switch-master}, say),
    heard from each of C{sentinels} from the moment this is made.
    """

    def __init__(self, sentinels, channel):
        self.channel = channel
        self._clients = [s.client() for s in sentinels]
        self._subscriptions = [
            c.pubsub(ignore_subscribe_messages=True) for c in self._clients
        ]
        for subscription in self._subscriptions:
            subscription.subscribe(channel)

    def wait(self, timeout=30.0):
        """
        Wait until every Sentinel has published an event on the channel, at
        most C{timeout} seconds in all; return each one's first event.

        @raise AssertionError: if one has not by then.
        """
        deadline = time.monotonic() + timeout
        events = []
        for subscription in self._subscriptions:
            while (left := deadline - time.monotonic()) > 0:
                message = subscription.get_message(timeout=left)
                if message is not None and message["type"] == "message":
                    events.append(message["data"])
                    break
            else:
                raise AssertionError(f"no {self.channel} within {timeout} s")
        return events

    def close(self):
        for subscription in self._subscriptions:
            subscription.close()
        for client in self._clients:
            client.close()


class OnSharedServer:
    """
    Mixed into a test case: the shared server, emptied, as C{self.server},
    a client of it as C{self.redis}, and a fake clock as C{self.clock}.
    """

    START = 1_700_000_000

    def setUp(self):
        from twisted.internet.task import Clock

        self.server = shared()
        self.redis = self.server.client()
        self.addCleanup(self.redis.close)
        self.redis.flushall()
        self.clock = Clock()
        self.clock.advance(self.START)
