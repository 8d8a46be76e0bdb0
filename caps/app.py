"""
What the vendor and driver apps share: command-line options, logging to
stderr, the client, and a clean stop on Ctrl-C.
"""

import os
import sys

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from caps.client import CapsClient
from caps.frames import NAME
from caps.options import positive_int
from caps.rotating import RotatingEndpoint

DEFAULT_BROKER = "tcp:localhost:3000"


class AppOptions(usage.Options):
    optParameters = [
        [
            "orders",
            "n",
            None,
            "Stop after this many orders (default: run on).",
            positive_int,
        ],
        [
            "login",
            None,
            None,
            "Log in as this clientId (default: the app's own). Only with a password.",
        ],
        [
            "password-file",
            None,
            None,
            "Log in with the password on this file's first line (else from "
            "$CAPS_PASSWORD, if set; else no login).",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["broker"] = []

    def opt_broker(self, description):
        self["broker"].append(description)

    # One line: usage.Options shows a docstring's indentation as is.
    opt_broker.__doc__ = (
        "The broker, as a Twisted client endpoint description (repeatable: "
        "several brokers sharing one store are tried in turn, the next one "
        "whenever a connection fails or is lost); default " + DEFAULT_BROKER + "."
    )
    opt_b = opt_broker

    def postOptions(self):
        from twisted.internet import reactor

        if not self["broker"]:
            self["broker"] = [DEFAULT_BROKER]
        for description in self["broker"]:
            try:
                clientFromString(reactor, description)
            except Exception as e:
                # The tls: parser reads its trust roots: a file instead of a
                # directory, or a missing one, fails here.
                raise usage.UsageError(
                    f"bad --broker {description!r}: {e} (tls: takes "
                    "trustRoots=DIR, a directory of .pem files)"
                ) from None
        self["password"] = os.environ.get("CAPS_PASSWORD") or None
        if self["password-file"] is not None:
            try:
                with open(self["password-file"], encoding="utf-8") as f:
                    self["password"] = f.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError(f"cannot read --password-file: {e}") from None
        if self["login"] is not None:
            check_name(self["login"], "--login")


def check_name(value, option):
    if not NAME.match(value):
        raise usage.UsageError(
            f"{option} {value!r} is not a valid clientId "
            "(1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit)"
        )


def broker_endpoint(reactor, descriptions):
    """
    The client endpoint for the brokers of C{--broker}: the one's own, or a
    L{RotatingEndpoint} that tries several in turn.
    """
    endpoints = [clientFromString(reactor, d) for d in descriptions]
    if len(endpoints) == 1:
        return endpoints[0]
    return RotatingEndpoint(endpoints, names=descriptions)


def parse(options, argv):
    """
    Parse C{argv} into C{options}, or exit with the error and the usage.
    """
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        raise SystemExit(f"{options}\nerror: {e}") from None
    return options


def emit(line):
    """
    Write one line of the app's story to standard output.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(reactor, options, build, client_id):
    """
    Connect a client to the broker, start the app C{build(client)} makes,
    and stop cleanly when it is done or the reactor shuts down (Ctrl-C):
    confirmed publishes and acknowledgements are waited for, a few seconds
    at most.

    @param client_id: the clientId to log in as, unless C{--login} says
        another (there is a login only with a password).

    @return: a L{Deferred} that fires when the app is done.
    """
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    endpoint = broker_endpoint(reactor, options["broker"])
    credentials = None
    if options["password"]:
        credentials = (options["login"] or client_id, options["password"])
    client = CapsClient(endpoint, reactor, credentials=credentials)
    app = build(client)
    reactor.addSystemEventTrigger("before", "shutdown", client.stop)
    client.start()
    app.start()
    return defer.ensureDeferred(_until_done(app, client))


async def _until_done(app, client):
    await app.done
    await client.stop()
