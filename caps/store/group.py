"""
Group commit, for the stores that write elsewhere (SQLite, Redis).

Changes are recorded as the broker makes them and written in groups: all
the changes of one pass of the reactor go out in one write (one SQLite
transaction, one call of a Redis Lua script), on a single writer thread,
so the reactor never waits for the disk or the network and a batch builds
up while the previous one is being written.  A failed write keeps its
changes, in order, and is tried again every L{RETRY_DELAY} seconds; the
store is unavailable meanwhile.
"""

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from caps.store import UNAVAILABLE, StoreUnavailable

# Seconds between attempts to write after a failed write.
RETRY_DELAY = 1.0


class WriterThread:
    """
    Work queued on the reactor thread and done in batches on one writer
    thread: the batch being written (C{_writing}: its work and the
    L{Deferred}s waiting for it) and the next one building up (C{_ops},
    C{_waiters}).  Used by L{GroupCommit} and by the shared Redis store's
    link (L{caps.store.shared}).

    @ivar commit_observers: callables told, on the reactor thread, the
        seconds each batch took (the metrics' histogram).
    """

    log = Logger()

    def __init__(self, clock, runner=None):
        self.clock = clock
        self._runner = runner
        self._pool = None
        self._ops = []
        self._waiters = []
        # (ops, waiters) of the batch being written, or None
        self._writing = None
        self.commit_observers = []

    @property
    def backlog(self):
        writing = len(self._writing[0]) if self._writing is not None else 0
        return len(self._ops) + writing

    def pending(self):
        if self._ops:
            return self._waiters
        if self._writing is not None:
            return self._writing[1]
        return None

    def flushed(self):
        if self._ops:
            waiters = self._waiters
        elif self._writing is not None:
            waiters = self._writing[1]
        else:
            return None
        d = defer.Deferred()
        waiters.append(d)
        return d

    def _observe(self, seconds):
        """
        Tell the commit observers how long a batch took.
        """
        if not isinstance(seconds, float):
            # A runner of a test's that does not return the write's result.
            return
        for observer in list(self.commit_observers):
            try:
                observer(seconds)
            except Exception:
                self.log.failure(
                    "commit observer {observer!r} failed", observer=observer
                )

    def _run(self, f, *args):
        if self._runner is not None:
            return self._runner(f, *args)
        if self._pool is None:
            self._pool = ThreadPool(1, 1, name="caps-store-writer")
            self._pool.start()
        return deferToThreadPool(self.clock, self._pool, f, *args)


class GroupCommit(WriterThread):
    """
    The part of a store that records changes and writes them in groups.

    A subclass gives C{name} (how logs name the store), C{handle} (what its
    writer functions take first: a connection) and C{_write_batch(ops,
    now)}, run on the writer thread, returning the seconds the write took;
    and C{_release()}, to let its resources go once closed.

    @ivar available: False after a failed write, until a retry succeeds;
        the broker refuses changes meanwhile.
    """

    log = Logger()
    name = "?"

    def __init__(self, clock, runner=None):
        super().__init__(clock, runner)
        self.available = True
        self._call = None
        self._closed = False
        # Writing stopped for good (see stop_writing)
        self._stopped = False

    def _record(self, op, params):
        if self._closed or self._stopped:
            return
        self._ops.append((op, params))
        if self._call is None and self._writing is None:
            self._call = self.clock.callLater(0, self._flush)

    def _after_writes(self, f, *args):
        """
        Run C{f(handle, *args)} on the writer thread once every change
        recorded so far is written.
        """
        waiting = self.flushed()
        if waiting is None:
            return self._run(f, self.handle, *args)
        return waiting.addCallback(lambda _: self._run(f, self.handle, *args))

    def _flush(self):
        self._call = None
        if self._writing is not None or not self._ops or self._stopped:
            return
        self._writing = (self._ops, self._waiters)
        self._ops, self._waiters = [], []
        d = self._run(self._write_batch, self._writing[0], self.clock.seconds())
        d.addBoth(self._written)

    def _written(self, result):
        ops, waiters = self._writing
        self._writing = None
        if isinstance(result, Failure):
            if self._gives_up(result):
                self.stop_writing()
            if self._stopped:
                for waiter in waiters:
                    waiter.errback(StoreUnavailable(UNAVAILABLE))
                return None
            if self.available:
                self.log.failure(
                    "cannot write to store {store}; retrying every {delay} s",
                    result,
                    store=self.name,
                    delay=RETRY_DELAY,
                )
            self.available = False
            # Written again first, in order, when the store recovers.
            self._ops = ops + self._ops
            for waiter in waiters:
                waiter.errback(StoreUnavailable(UNAVAILABLE))
            if not self._closed:
                self._call = self.clock.callLater(RETRY_DELAY, self._flush)
            return None
        if not self.available and not self._stopped:
            self.log.info("store {store} is writable again", store=self.name)
            self.available = True
        self._observe(result)
        for waiter in waiters:
            waiter.callback(None)
        if self._ops and self._call is None:
            self._flush()
        return None

    def _gives_up(self, failure):
        """
        Whether a failed write means the store must never write again
        (say, another broker has taken it); by default no: it is retried.
        """
        return False

    def stop_writing(self):
        """
        Never write again: drop the changes not written yet, fail every
        wait for them, and stay unavailable (the broker refuses changes).
        """
        if self._stopped:
            return
        self._stopped = True
        self.available = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._ops = []
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(StoreUnavailable(UNAVAILABLE))

    def close(self):
        """
        Write what is pending, then release the store and the writer
        thread.
        """
        return defer.ensureDeferred(self._close())

    async def _close(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        while self._writing is not None or (self._ops and self.available):
            waiting = self.flushed()
            self._flush()
            try:
                await waiting
            except StoreUnavailable:
                break
        self._closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._pool is not None:
            self._pool.stop()
        self._release()
