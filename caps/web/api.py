"""
The JSON API: the queues, one queue's messages (peeked, paged), purge and
requeue, the clients and the recent events, as one observer may see them.

An observer is a L{caps.acl.Permissions} (a logged-in client) or
L{EVERYTHING} (an open broker): anything with C{sees(clientId)},
C{sees_all} and C{consume_refusal(clientId, event)}.
"""

import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from caps import codec
from caps.frames import ProtocolError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Recent events in one answer, at most: page on with after=last.
EVENTS_LIMIT = 1000

_NUMBER = re.compile(rb"[0-9]{1,18}\Z")
# "<", ">" and "&" occur in JSON text only inside strings, where their
# escapes mean the same: a body is then never taken for markup.
_MARKUP = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"))


class _Everything:
    """
    What an open broker shows anyone: everything.
    """

    client_id = None
    sees_all = True

    def sees(self, client_id):
        return True

    def consume_refusal(self, client_id, event):
        return None


EVERYTHING = _Everything()


class WebError(Exception):
    """
    A request answered with an error: HTTP C{status}, a stable C{code}.
    """

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code


def forbidden(message):
    return WebError(403, "forbidden", message)


def encode(value):
    """
    A JSON value as UTF-8 bytes, with no C{<}, C{>} or C{&} in it.
    """
    body = codec.dumps(value)
    for raw, escaped in _MARKUP:
        body = body.replace(raw, escaped)
    return body


def answer(request, status, value):
    """
    Set C{request}'s status and JSON content type; the body to return.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return encode(value)


class ErrorResource(resource.Resource):
    """
    Answers every request with one JSON error.
    """

    isLeaf = True

    def __init__(self, status, code, message):
        super().__init__()
        self.status = status
        self.code = code
        self.message = message

    def render(self, request):
        return answer(
            request, self.status, {"error": self.code, "message": self.message}
        )

    def getChildWithDefault(self, name, request):
        return self


def not_found(what="no such page"):
    return ErrorResource(404, "not-found", what)


def text_arg(request, name):
    """
    The last value of query argument C{name} as text, or L{None}.
    """
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise WebError(400, "bad-request", f"{name} is not UTF-8") from None


def number(text, name, default, high=None):
    """
    C{text} (bytes) as a whole number from 0 to C{high}, or C{default} if
    it is L{None}.
    """
    if text is None:
        return default
    if not _NUMBER.match(text) or high is not None and int(text) > high:
        limit = f" up to {high}" if high is not None else ""
        raise WebError(400, "bad-request", f"{name} must be a whole number{limit}")
    return int(text)


def int_arg(request, name, default, high=None):
    values = request.args.get(name.encode("ascii"))
    return number(values[-1] if values else None, name, default, high)


def check_sees(view, client_id):
    """
    Raise a 403 unless C{view} may see C{client_id} (every client, for
    L{None}).
    """
    if client_id is None:
        if not view.sees_all:
            raise forbidden('only an operator (observe = ["*"]) sees every client')
    elif not view.sees(client_id):
        raise forbidden(f"{view.client_id} may not see {client_id}'s queues")


def queues_body(broker, view, client_id=None):
    """
    The body of C{GET /api/queues}: the time, the totals and the queues
    C{view} sees (of C{client_id} only, if given).  Only an operator gets
    the broker's totals; others get those of their queues, where the
    broker counts them per queue (L{None} where it does not).
    """
    if client_id is not None:
        rows = broker.queue_rows(client_id=client_id) if view.sees(client_id) else []
    else:
        rows = broker.queue_rows(None if view.sees_all else view.sees)
    if view.sees_all:
        t = broker.monitor.totals
        totals = {
            "published": t.published,
            "delivered": t.delivered,
            "redelivered": t.redelivered,
            "acknowledged": t.acknowledged,
            "deadLettered": t.dead_lettered,
        }
    else:
        totals = {
            "published": sum(r["published"] for r in rows),
            "delivered": sum(r["delivered"] for r in rows),
            "redelivered": None,
            "acknowledged": None,
            "deadLettered": None,
        }
    return {"time": broker.clock.seconds(), "totals": totals, "queues": rows}


def event_json(entry, view):
    """
    One recent message as C{view} may see it: only the recipients it sees.
    """
    value = entry.as_json()
    if not view.sees_all:
        value["recipients"] = [r for r in value["recipients"] if view.sees(r)]
    return value


class Api(resource.Resource):
    """
    Everything under C{/api/}, for one observer.

    @param stream: called as C{stream(request, view)} for C{/api/stream};
        returns C{NOT_DONE_YET}.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, broker, view, stream):
        super().__init__()
        self.broker = broker
        self.view = view
        self.stream = stream

    def render(self, request):
        try:
            handler, methods, args = self._route(request.postpath)
            method = request.method.decode("ascii", "replace")
            if method == "HEAD" and "GET" in methods and handler != self.stream:
                # (A stream never ends: HEAD would hold it open.)
                method = "GET"
            if method not in methods:
                request.setHeader(b"allow", ", ".join(methods).encode("ascii"))
                raise WebError(405, "method-not-allowed", f"use {' or '.join(methods)}")
            result = handler(request, *args)
            if result is server.NOT_DONE_YET:
                return result
            if isinstance(result, defer.Deferred):
                # A broker sharing its store answers from Redis, later.
                result.addCallback(lambda value: answer(request, 200, value))
                result.addErrback(self._failed, request)
                result.addCallback(self._finish, request)
                return server.NOT_DONE_YET
            return answer(request, 200, result)
        except Exception:
            return self._failed(Failure(), request)

    def _failed(self, failure, request):
        """
        The body of the answer to a request that failed, its status set.
        """
        if failure.check(WebError):
            e = failure.value
            return answer(request, e.status, {"error": e.code, "message": str(e)})
        if failure.check(ProtocolError):
            # store-unavailable: try again later.
            e = failure.value
            return answer(request, 503, {"error": e.code, "message": str(e)})
        self.log.failure(
            "web API request {method} {uri} failed",
            failure,
            method=request.method,
            uri=request.uri,
        )
        return answer(
            request,
            500,
            {
                "error": "internal-error",
                "message": "the broker failed; see its log",
            },
        )

    def _finish(self, body, request):
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(body)
            request.finish()

    def _route(self, segments):
        try:
            path = [s.decode("utf-8") for s in segments]
        except UnicodeDecodeError:
            raise WebError(400, "bad-request", "the path is not UTF-8") from None
        if len(path) > 1 and path[-1] == "":
            del path[-1]
        match path:
            case ["queues"]:
                return self.queues, ("GET",), ()
            case ["queues", client_id, event, "messages"]:
                return self.messages, ("GET",), (client_id, event)
            case ["queues", client_id, event, "purge"]:
                return self.purge, ("POST",), (client_id, event)
            case ["queues", client_id, event, "requeue"]:
                return self.requeue, ("POST",), (client_id, event)
            case ["clients"]:
                return self.clients, ("GET",), ()
            case ["events"]:
                return self.events, ("GET",), ()
            case ["stream"]:
                return self.stream, ("GET",), (self.view,)
        raise WebError(404, "not-found", "no such API path")

    def _queue(self, client_id, event):
        """
        The queue (clientId, event), if the observer may consume it.
        """
        view = self.view
        refusal = None
        if not view.sees(client_id):
            refusal = f"{view.client_id} may not see {client_id}'s queues"
        else:
            refusal = view.consume_refusal(client_id, event)
        if refusal is not None:
            raise forbidden(refusal)
        queue = self.broker.queue(client_id, event)
        if queue is None:
            raise WebError(404, "no-queue", f"no queue ({client_id}, {event})")
        return queue

    def queues(self, request):
        return queues_body(self.broker, self.view)

    def messages(self, request, client_id, event):
        after = int_arg(request, "after", 0)
        limit = int_arg(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        self._queue(client_id, event)
        return _then(self.broker.peek(client_id, event, after, limit), _messages)

    def purge(self, request, client_id, event):
        self._queue(client_id, event)
        return _then(
            self.broker.purge(client_id, event), lambda count: {"purged": count}
        )

    def requeue(self, request, client_id, event):
        message_id = text_arg(request, "messageId")
        view = self.view
        if not view.sees(client_id):
            raise forbidden(f"{view.client_id} may not see {client_id}'s queues")
        refusal = view.consume_refusal(client_id, event)
        if refusal is not None:
            raise forbidden(refusal)
        return self.broker.requeue(client_id, event, message_id)

    def clients(self, request):
        view = self.view
        if view.sees_all:
            return {"clients": self.broker.client_rows()}
        sees = view.sees
        rows = self.broker.client_rows(sees)
        for row in rows:
            row["subscriptions"] = [
                s for s in row["subscriptions"] if sees(s["clientId"])
            ]
            if not sees(row["clientId"]):
                # Another client's connection, consuming a queue it sees:
                # who it is, where from and what else it holds are not
                # this observer's business.
                row["address"] = row["clientId"] = row["inFlight"] = None
        return {"clients": rows}

    def events(self, request):
        client_id = text_arg(request, "clientId")
        after = int_arg(request, "after", 0)
        check_sees(self.view, client_id)
        limit = int_arg(request, "limit", EVENTS_LIMIT, EVENTS_LIMIT)
        tail = int_arg(request, "tail", None, EVENTS_LIMIT)
        monitor = self.broker.monitor
        entries = monitor.since(after, client_id)
        entries = entries[-tail:] if tail else entries[:limit]
        oldest = monitor.oldest
        return {
            "events": [event_json(e, self.view) for e in entries],
            "last": entries[-1].seq if entries else after,
            # Messages after `after` that fell out of the bounded log
            "missed": oldest is not None and after < oldest - 1,
        }


def _messages(peeked):
    rows, more = peeked
    for row in rows:
        row["payload"] = codec.loads(row["payload"].encode("utf-8"))
    return {"messages": rows, "more": more}


def _then(result, f):
    """
    C{f(result)}, or, for a L{Deferred} (a broker sharing its store
    answers later), a L{Deferred} of it.
    """
    if isinstance(result, defer.Deferred):
        return result.addCallback(f)
    return f(result)
