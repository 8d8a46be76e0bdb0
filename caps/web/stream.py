"""
Server-sent events (C{GET /api/stream}): the recent messages a page missed,
then each new one as it is published, and a snapshot of the queues every
second.

A message is sent as C{id: <seq>}, so a browser that reconnects (after the
broker restarted, say) sends C{Last-Event-ID} and gets what followed it
from the broker's recent log, without gaps or duplicates.  A reader that
falls behind (its connection's send buffer full) is sent nothing until it
drains; then it is sent, from the recent log, what it missed.
"""

import attrs
from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import server
from zope.interface import implementer

from caps.web.api import (
    WebError,
    check_sees,
    encode,
    event_json,
    number,
    queues_body,
    text_arg,
)

RETRY_MS = 1000
SNAPSHOT = 1.0
KEEPALIVE = 15.0
# Streams open at once, all observers together.
MAX_STREAMS = 1000


@attrs.define(eq=False)
class Streams:
    """
    The streams open on one broker's web site.
    """

    broker: object
    limit: int = MAX_STREAMS
    open: set = attrs.Factory(set)

    def render(self, request, view):
        """
        Start a stream on C{request} for C{view}.
        """
        client_id = text_arg(request, "clientId")
        check_sees(view, client_id)
        after = number(request.args.get(b"after", [None])[-1], "after", 0)
        after = number(request.getHeader(b"last-event-id"), "Last-Event-ID", after)
        if len(self.open) >= self.limit:
            raise WebError(503, "too-many-streams", "too many streams open; later")
        if request.channel is None:
            # It left while its password was being checked.
            return server.NOT_DONE_YET
        stream = EventStream(self, request, view, client_id, after)
        try:
            stream.start()
        except BaseException:
            stream._stop()
            raise
        self.open.add(stream)
        return server.NOT_DONE_YET


@implementer(IPushProducer)
@attrs.define(eq=False)
class EventStream:
    """
    One stream: what C{view} sees of the messages involving C{client_id}
    (all, for L{None}) after sequence number C{last}.
    """

    streams: Streams
    request: object
    view: object
    client_id: str | None
    last: int
    log = Logger()
    paused: bool = False
    # Messages were published while paused: catch up from the recent log.
    behind: bool = False
    done: bool = False
    # The newest seq looked at (sent, or not for this stream); -1: none yet
    scanned: int = -1
    _snapshots: task.LoopingCall = attrs.field(init=False)
    _keepalive: task.LoopingCall = attrs.field(init=False)

    @property
    def broker(self):
        return self.streams.broker

    def __attrs_post_init__(self):
        clock = self.broker.clock
        self._snapshots = task.LoopingCall(self._snapshot)
        self._snapshots.clock = clock
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = clock

    def start(self):
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)
        request.write(b"retry: %d\n\n" % RETRY_MS)
        monitor = self.broker.monitor
        if self.client_id is None:
            monitor.listeners.add(self._published)
        else:
            monitor.watch(self.client_id, self._published)
        self._catch_up()
        self._snapshots.start(SNAPSHOT, now=True).addErrback(self._failed)
        self._keepalive.start(KEEPALIVE, now=False).addErrback(self._failed)

    def _write(self, data):
        if not self.done:
            self.request.write(data)

    def _send(self, entry):
        self.last = entry.seq
        data = encode(event_json(entry, self.view))
        self._write(b"id: %d\nevent: message\ndata: %s\n\n" % (entry.seq, data))

    def _catch_up(self):
        """
        Send the recent messages after the last one sent, until paused.
        If messages it had not looked at yet have left the bounded log
        meanwhile (it was paused too long), first tell the page to start
        over (C{event: reset}): some of them may have been for it.
        """
        self.behind = False
        monitor = self.broker.monitor
        oldest = monitor.oldest
        if self.scanned >= 0 and oldest is not None and self.scanned < oldest - 1:
            self._write(b"event: reset\ndata: {}\n\n")
        for entry in monitor.since(self.last, self.client_id):
            if self.paused or self.done:
                self.behind = True
                return
            self._send(entry)
        newest = monitor.last
        self.scanned = newest if newest is not None else self.last

    def _published(self, entry):
        """
        The monitor's listener: a message was just published.
        """
        try:
            if self.paused or self.behind:
                self.behind = True
                return
            if entry.seq > self.last and (
                self.client_id is None or entry.involves(self.client_id)
            ):
                self._send(entry)
            self.scanned = entry.seq
        except Exception:
            # Never into the broker's publish.
            self.log.failure("stream of {client} failed", client=self.client_id)
            self._abort()

    def _snapshot(self):
        if not self.paused:
            body = encode(queues_body(self.broker, self.view, self.client_id))
            self._write(b"event: queues\ndata: %s\n\n" % body)

    def _ping(self):
        if not self.paused:
            self._write(b": keepalive\n\n")

    def _failed(self, failure):
        self.log.failure(
            "stream of {client} failed", failure=failure, client=self.client_id
        )
        self._abort()

    def _abort(self):
        self._stop()
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    # IPushProducer: the connection's send buffer

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        if self.done:
            return
        self.paused = False
        if self.behind:
            self._catch_up()

    def stopProducing(self):
        self._stop()

    def _finished(self, _):
        """
        The request is over: the connection was closed.
        """
        self._stop()
        request = self.request
        if request.producer is not None and request.channel is not None:
            request.unregisterProducer()

    def _stop(self):
        if self.done:
            return
        self.done = True
        self.streams.open.discard(self)
        monitor = self.broker.monitor
        if self.client_id is None:
            monitor.listeners.discard(self._published)
        else:
            monitor.unwatch(self.client_id, self._published)
        for call in (self._snapshots, self._keepalive):
            if call.running:
                call.stop()
