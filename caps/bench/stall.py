"""
The stall benchmark, C{python -m caps.bench --stall}: a broker in this
process on an SQLite store, publishing into it in bursts from the reactor,
and how late a 1 ms timer fires: with the store's writer thread (how the
broker runs) and with every commit run on the reactor thread instead, for
comparison.
"""

import os
import tempfile
import time

from caps.bench.load import PAYLOAD
from caps.bench.report import percentile


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
