"""
Many deadlines, one timer: a heap of (when, what) on an injected clock,
with a single pending C{DelayedCall} for the earliest.

Adding a deadline costs O(log n); cancelling one is free (the caller's
callback decides, when it comes due, whether it still matters), so the
ack timeout of every delivery and the expiry of every message can each be
a deadline without a C{DelayedCall} apiece.
"""

import heapq
import itertools

from twisted.logger import Logger


class Deadlines:
    """
    @param clock: an C{IReactorTime}.
    @param due: called as C{due(item)} for each item whose time has come,
        in time order.
    """

    log = Logger()

    def __init__(self, clock, due):
        self._clock = clock
        self._due = due
        self._heap = []
        self._order = itertools.count()
        self._call = None

    def __len__(self):
        return len(self._heap)

    def add(self, when, item):
        heapq.heappush(self._heap, (when, next(self._order), item))
        # The earliest deadline, which is not always this one: add can be
        # called while earlier ones are being handled.
        first = self._heap[0][0]
        delay = max(0, first - self._clock.seconds())
        if self._call is None:
            self._call = self._clock.callLater(delay, self._fire)
        elif first < self._call.getTime():
            self._call.reset(delay)

    def _fire(self):
        self._call = None
        heap = self._heap
        now = self._clock.seconds()
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            try:
                self._due(item)
            except Exception:
                # One failure must not stop every later deadline.
                self.log.failure("handling a deadline failed")
        if heap and self._call is None:
            self._call = self._clock.callLater(max(0, heap[0][0] - now), self._fire)

    def stop(self):
        """
        Forget every deadline; nothing more fires.
        """
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._heap.clear()
