"""
The hub's C{EVENT} log: one line for every message the broker accepts.

Logging each message on its own through twisted.logger cost more CPU than
all the rest of a publish; the lines of the messages accepted in one
reactor turn go out as one log event instead, one line each.
"""

import functools
import json
import math
from datetime import datetime, timezone


class EventLog:
    """
    Collects the messages accepted in one reactor turn and logs them
    together at the end of the turn.

    @ivar clock: an C{IReactorTime}, to schedule the end-of-turn flush.
    @ivar log: the L{twisted.logger.Logger} the lines are logged to.
    """

    def __init__(self, clock, log):
        self.clock = clock
        self.log = log
        self._pending = []
        self._call = None

    def add(self, message):
        """
        Log a message accepted now (at the end of this reactor turn).
        """
        if self._call is None:
            self._call = self.clock.callLater(0, self.flush)
        self._pending.append(message)

    def flush(self):
        """
        Log the messages collected so far.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if self._pending:
            batch, self._pending = self._pending, []
            self.log.info("{events}", events=_Lines(batch))


class _Lines:
    """
    The C{EVENT} lines of a batch of messages, formatted only if an
    observer formats them.
    """

    __slots__ = ("messages",)

    def __init__(self, messages):
        self.messages = messages

    def __format__(self, spec):
        return "\n".join(map(line, self.messages))


def line(m):
    """
    One message's log line: C{EVENT {"event": ..., "time": ..., "payload": ...}}.
    """
    return (
        f'EVENT {{"event": {_event_json(m.event)}, "time": "{_iso(m.time)}", '
        f'"payload": {m.payload.decode("utf-8")}}}'
    )


@functools.lru_cache(maxsize=1024)
def _event_json(event):
    return json.dumps(event)


@functools.lru_cache(maxsize=16)
def _iso_second(second):
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _iso(seconds):
    """
    C{datetime.isoformat()} of a time in UTC, with its date and time worked
    out once a second: microseconds when they are not zero, then +00:00.
    """
    second = math.floor(seconds)
    micro = round((seconds - second) * 1_000_000)
    if micro == 1_000_000:
        second, micro = second + 1, 0
    if micro:
        return f"{_iso_second(second)}.{micro:06d}+00:00"
    return f"{_iso_second(second)}+00:00"
