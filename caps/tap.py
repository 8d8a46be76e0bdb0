"""
The C{twistd caps-broker} command: options and the service they build.
"""

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python import usage

from caps.broker import Broker
from caps.options import positive_int
from caps.protocol import DEFAULT_MAX_LINE, BrokerFactory
from caps.store import open_store
from caps.store.sqlite import SYNC_MODES

DEFAULT_LISTEN = "tcp:3000:interface=127.0.0.1"
DEFAULT_STORE = "sqlite:caps.sqlite3"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the CAPS queue broker: newline-delimited JSON over TCP (or any "
        "Twisted server endpoint). See docs/protocol.md."
    )
    optParameters = [
        [
            "max-line",
            None,
            DEFAULT_MAX_LINE,
            "Longest line (frame) a client may send, in bytes.",
            positive_int,
        ],
        [
            "store",
            None,
            DEFAULT_STORE,
            "Where queues are kept: sqlite:PATH (a file; every confirmed change "
            "is on disk) or memory (lost when the broker stops).",
        ],
        [
            "sync",
            None,
            "full",
            "With sqlite: full syncs every commit to disk, so nothing confirmed "
            "is lost even on power loss; normal survives a crash of the broker "
            "but not of the machine.",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """
        Listen on this server endpoint description (repeatable); default
        tcp:3000:interface=127.0.0.1.
        """
        self["listen"].append(description)

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        from twisted.internet import reactor

        for description in self["listen"]:
            try:
                endpoints.serverFromString(reactor, description)
            except ValueError as e:
                raise usage.UsageError(f"bad --listen {description!r}: {e}") from None
        kind, _, path = self["store"].partition(":")
        if not (kind == "memory" and not path or kind == "sqlite" and path):
            raise usage.UsageError(
                f"--store must be memory or sqlite:PATH (not {self['store']!r})"
            )
        if self["sync"] not in SYNC_MODES:
            raise usage.UsageError(
                f"--sync must be full or normal (not {self['sync']!r})"
            )


class ListenError(SystemExit):
    """
    The broker could not listen where it was told to: twistd exits with this
    one-line message instead of a traceback.
    """


class ListenService(service.Service):
    """
    Listens on several endpoints, and fails the start if any of them fails.
    Logs each bound address (C{CAPS broker listening on 127.0.0.1:3000}):
    with port 0, that line tells which port was chosen.
    """

    log = Logger()

    def __init__(self, reactor, descriptions, factory):
        self.reactor = reactor
        self.descriptions = descriptions
        self.factory = factory
        self.ports = []

    def privilegedStartService(self):
        super().privilegedStartService()
        for description in self.descriptions:
            endpoint = endpoints.serverFromString(self.reactor, description)
            results = []
            endpoint.listen(self.factory).addBoth(results.append)
            port = results[0] if results else None
            if isinstance(port, Failure):
                raise ListenError(
                    f"caps-broker: cannot listen on {description}: "
                    f"{port.getErrorMessage()}"
                )
            if port is None:
                raise ListenError(f"caps-broker: {description} did not start listening")
            self.ports.append(port)
            self.log.info(
                "CAPS broker listening on {address}", address=_address(port.getHost())
            )

    def startService(self):
        if not self.ports:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports]
        )


def _address(address):
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", address)
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    if ":" in host:
        return f"[{host}]:{address.port}"
    return f"{host}:{address.port}"


class StoreService(service.Service):
    """
    Closes the store when the broker stops, after the listeners: what is
    pending is written first.
    """

    def __init__(self, store):
        self.store = store

    def stopService(self):
        super().stopService()
        return self.store.close()


def makeService(options, reactor=None):
    """
    Build the broker service from parsed L{Options}.

    @raise StoreError: if the store cannot be opened (a one-line reason).
    """
    if reactor is None:
        from twisted.internet import reactor
    store = open_store(options["store"], reactor, sync=options["sync"])
    broker = Broker(clock=reactor, store=store)
    factory = BrokerFactory(broker, max_line=options["max-line"])
    top = service.MultiService()
    StoreService(store).setServiceParent(top)
    ListenService(reactor, options["listen"], factory).setServiceParent(top)
    return top
