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

from caps.redisserver import AVAILABLE, HOST, RedisServer, free_port, skip_reason

__all__ = ["AVAILABLE", "HOST", "RedisServer", "free_port", "shared", "skip_reason"]

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
