"""
C{python -m caps.admin}: look at and manage a running broker's queues
through its JSON API (C{twistd caps-broker --web ...}).

    python -m caps.admin [--url URL] [--user CLIENTID --password-file FILE]
                         [--json] COMMAND

Commands: C{queues}, C{peek CLIENTID EVENT [--after SEQ] [--limit N]},
C{purge CLIENTID EVENT}, C{requeue CLIENTID EVENT [--message-id ID]},
C{clients}.  An aligned table for people; with C{--json}, the API's JSON
as it came.  Exit codes: 0 done, 1 an error (the broker refused, or could
not be reached), 2 a usage error.

Scripts can call L{main} (C{main(argv, stdout)} returns the exit code) or
use L{Admin} directly.  Blocking standard-library HTTP: no reactor.
"""

import argparse
import base64
import datetime
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 10.0
# Longest payload shown in a table (--json shows all of it).
PAYLOAD_WIDTH = 60

OK, ERROR, USAGE = 0, 1, 2


class AdminError(Exception):
    """
    The broker refused a request or could not be reached: a one-line
    reason.  C{status} is the HTTP status, if there was an answer; C{code}
    the API's error code, if it gave one.
    """

    def __init__(self, message, status=None, code=None):
        super().__init__(message)
        self.status = status
        self.code = code


class Admin:
    """
    The broker's JSON API, one blocking HTTP request per call.

    Every call returns C{(parsed JSON, the body as text)} and raises
    L{AdminError}.
    """

    def __init__(self, url=DEFAULT_URL, user=None, password=None, timeout=TIMEOUT):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._authorization = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode("utf-8"))
            self._authorization = "Basic " + token.decode("ascii")

    def queues(self):
        return self.request("GET", ("queues",))

    def peek(self, client_id, event, after=None, limit=None):
        query = {}
        if after is not None:
            query["after"] = after
        if limit is not None:
            query["limit"] = limit
        return self.request("GET", ("queues", client_id, event, "messages"), query)

    def purge(self, client_id, event):
        return self.request("POST", ("queues", client_id, event, "purge"))

    def requeue(self, client_id, event, message_id=None):
        query = {} if message_id is None else {"messageId": message_id}
        return self.request("POST", ("queues", client_id, event, "requeue"), query)

    def clients(self):
        return self.request("GET", ("clients",))

    def request(self, method, segments, query=None):
        """
        Send one request to C{/api/<segments>} (each segment quoted) and
        return its JSON answer and body.
        """
        path = "/".join(urllib.parse.quote(s, safe="") for s in segments)
        target = f"{self.url}/api/{path}"
        if query:
            target += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(
            target,
            data=b"" if method == "POST" else None,
            method=method,
            headers={"Accept": "application/json"},
        )
        if self._authorization is not None:
            request.add_header("Authorization", self._authorization)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            raise self._refused(e) from None
        except urllib.error.URLError as e:
            raise AdminError(f"cannot reach {self.url}: {_reason(e.reason)}") from None
        except (TimeoutError, socket.timeout):
            raise AdminError(
                f"{self.url} did not answer within {self.timeout:g} s"
            ) from None
        except (OSError, ValueError) as e:
            # A connection reset, an invalid answer (http.client's errors
            # are ValueErrors or OSErrors).
            raise AdminError(f"cannot talk to {self.url}: {e}") from None
        text = body.decode("utf-8", "replace")
        try:
            return json.loads(text), text
        except ValueError:
            raise AdminError(
                f"{target} did not answer JSON (is it a CAPS broker's --web?)"
            ) from None

    def _refused(self, error):
        try:
            answer = json.loads(error.read().decode("utf-8", "replace"))
        except (ValueError, OSError):
            answer = None
        code = message = None
        if isinstance(answer, dict):
            code, message = answer.get("error"), answer.get("message")
        status = error.code
        if status == 401:
            hint = (
                "wrong clientId or password"
                if self._authorization is not None
                else "the broker needs a login: --user CLIENTID with "
                "--password-file FILE or $CAPS_PASSWORD"
            )
            return AdminError(f"401 unauthorized: {hint}", status, code)
        if message is None:
            message = error.reason or "no reason given"
        return AdminError(f"{status} {code or 'error'}: {message}", status, code)


def _reason(reason):
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the broker running with --web?)"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    return getattr(reason, "strerror", None) or str(reason)


# Tables


def _clean(text):
    """
    Text safe to print on a terminal on one line: control characters
    (newlines, escapes from user data) shown as escapes.
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return _clean(str(value))


def _numeric(values):
    """
    Whether a column holds numbers (and nothing else but blanks).
    """
    known = [v for v in values if v is not None]
    return bool(known) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in known
    )


def table(columns, rows):
    """
    An aligned table: a header of C{columns}, then one line per row (a
    list of cells); numbers aligned right.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max([len(name)] + [len(row[i]) for row in cells])
        for i, name in enumerate(columns)
    ]
    right = [_numeric([row[i] for row in rows]) for i in range(len(columns))]

    def line(values):
        out = [
            v.rjust(w) if r else v.ljust(w)
            for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(columns)] + [line(row) for row in cells]) + "\n"


def _time(seconds):
    return (
        datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def _payload(value):
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if len(text) > PAYLOAD_WIDTH:
        text = text[: PAYLOAD_WIDTH - 3] + "..."
    return text


QUEUE_COLUMNS = (
    "clientId",
    "event",
    "depth",
    "inFlight",
    "deadLetters",
    "consumers",
    "subscribed",
    "oldestAge",
    "published",
    "delivered",
)
MESSAGE_COLUMNS = ("seq", "messageId", "time", "deliveries", "inFlight", "payload")
CLIENT_COLUMNS = ("address", "clientId", "inFlight", "subscriptions")


def show_queues(answer, args):
    text = table(
        QUEUE_COLUMNS,
        [[q.get(c) for c in QUEUE_COLUMNS] for q in answer.get("queues", [])],
    )
    totals = answer.get("totals") or {}
    if totals:
        text += (
            "\ntotals: "
            + "  ".join(f"{_clean(k)} {_cell(v)}" for k, v in totals.items())
            + "\n"
        )
    return text


def show_messages(answer, args):
    rows = [
        [
            m.get("seq"),
            m.get("messageId"),
            _time(m["time"]) if isinstance(m.get("time"), (int, float)) else None,
            m.get("deliveries"),
            m.get("inFlight"),
            _payload(m.get("payload")),
        ]
        for m in answer.get("messages", [])
    ]
    text = table(MESSAGE_COLUMNS, rows)
    more = answer.get("more") or 0
    if more:
        last = rows[-1][0] if rows else args.after
        text += f"\n{more} more: --after {last}\n"
    return text


def show_clients(answer, args):
    rows = [
        [
            c.get("address"),
            c.get("clientId"),
            c.get("inFlight"),
            ", ".join(
                f"{s.get('clientId')}/{s.get('event')}"
                for s in c.get("subscriptions", [])
            )
            or None,
        ]
        for c in answer.get("clients", [])
    ]
    return table(CLIENT_COLUMNS, rows)


def show_purge(answer, args):
    return table(
        ("clientId", "event", "purged"),
        [[args.client_id, args.event, answer.get("purged")]],
    )


def show_requeue(answer, args):
    columns = ("clientId", "event", "requeued")
    return table(columns, [[answer.get(c) for c in columns]])


# The command line


class _Usage(Exception):
    """
    A usage error: the message, and the usage of the (sub)command it is
    about, if not the top one.
    """

    def __init__(self, message, usage=None):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that raises on usage errors instead of exiting, so
    that L{main} returns 2.
    """

    def error(self, message):
        raise _Usage(f"{self.prog}: {message}", self.format_usage())


def _count(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def parser():
    top = _Parser(
        prog="python -m caps.admin",
        # Else --password would be taken for --password-file.
        allow_abbrev=False,
        description="Look at and manage a CAPS broker's queues through its "
        "JSON API (twistd caps-broker --web ...).",
    )
    top.add_argument(
        "--url",
        default=os.environ.get("CAPS_URL", DEFAULT_URL),
        help=f"the broker's web address (default $CAPS_URL or {DEFAULT_URL})",
    )
    top.add_argument("--user", metavar="CLIENTID", help="log in as this clientId")
    top.add_argument(
        "--password-file",
        metavar="FILE",
        help="the password on this file's first line (else $CAPS_PASSWORD)",
    )
    # Only to say why it is refused: a password on the command line shows
    # in ps and in shell histories.
    top.add_argument("--password", help=argparse.SUPPRESS)
    top.add_argument(
        "--json", action="store_true", help="print the API's JSON, for scripts"
    )
    top.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT,
        help=f"seconds to wait for an answer (default {TIMEOUT:g})",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser("queues", help="every queue, with its counts")
    peek = commands.add_parser(
        "peek", help="a queue's messages, without consuming them"
    )
    peek.add_argument("client_id", metavar="CLIENTID")
    peek.add_argument("event", metavar="EVENT", help="(EVENT.dead: dead letters)")
    peek.add_argument(
        "--after", type=_count(0), metavar="SEQ", help="after this sequence number"
    )
    peek.add_argument("--limit", type=_count(1), metavar="N", help="at most N")
    purge = commands.add_parser(
        "purge", help="delete a queue's messages that are not in flight"
    )
    purge.add_argument("client_id", metavar="CLIENTID")
    purge.add_argument("event", metavar="EVENT")
    requeue = commands.add_parser(
        "requeue", help="move dead letters back to their queue"
    )
    requeue.add_argument("client_id", metavar="CLIENTID")
    requeue.add_argument("event", metavar="EVENT", help="the queue (not EVENT.dead)")
    requeue.add_argument(
        "--message-id", metavar="ID", help="only this message (default: all)"
    )
    commands.add_parser("clients", help="connected clients and what they consume")
    return top


def _password(args):
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise _Usage(
                f"python -m caps.admin: cannot read --password-file: {e.strerror}"
            ) from None
    return os.environ.get("CAPS_PASSWORD") or None


def _run(admin, args):
    if args.command == "queues":
        return admin.queues(), show_queues
    if args.command == "peek":
        answer = admin.peek(args.client_id, args.event, args.after, args.limit)
        return answer, show_messages
    if args.command == "purge":
        return admin.purge(args.client_id, args.event), show_purge
    if args.command == "requeue":
        return admin.requeue(args.client_id, args.event, args.message_id), show_requeue
    return admin.clients(), show_clients


def main(argv=None, stdout=None, stderr=None):
    """
    Run one command; return the exit code (0 done, 1 error, 2 usage).
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    top = parser()
    try:
        try:
            args = top.parse_args(sys.argv[1:] if argv is None else argv)
        except SystemExit as e:
            # --help (argparse printed it)
            return e.code or OK
        if args.password is not None:
            raise _Usage(
                f"{top.prog}: no --password: give it in --password-file FILE "
                "or $CAPS_PASSWORD"
            )
        password = _password(args)
        if args.user is not None and password is None:
            raise _Usage(
                f"{top.prog}: --user needs --password-file FILE or $CAPS_PASSWORD"
            )
        if args.user is None and args.password_file is not None:
            raise _Usage(f"{top.prog}: --password-file needs --user CLIENTID")
        scheme = urllib.parse.urlsplit(args.url).scheme
        if scheme not in ("http", "https"):
            raise _Usage(f"{top.prog}: --url must be http:// or https:// ({args.url})")
    except _Usage as e:
        stderr.write((e.usage or top.format_usage()) + str(e) + "\n")
        return USAGE
    admin = Admin(
        args.url,
        args.user,
        password if args.user is not None else None,
        timeout=args.timeout,
    )
    try:
        (answer, body), show = _run(admin, args)
    except AdminError as e:
        stderr.write(f"caps.admin: {e}\n")
        return ERROR
    if args.json:
        stdout.write(body if body.endswith("\n") else body + "\n")
        return OK
    try:
        text = show(answer, args)
    except (AttributeError, KeyError, TypeError):
        stderr.write(
            f"caps.admin: {args.url} gave an answer of a shape this version "
            "cannot show (try --json)\n"
        )
        return ERROR
    stdout.write(text)
    return OK


if __name__ == "__main__":
    sys.exit(main())
