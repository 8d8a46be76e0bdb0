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

DEFAULT_LISTEN = "tcp:3000:interface=127.0.0.1"
STORES = ("memory",)


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
        ["store", None, "memory", "Where queues are kept: " + ", ".join(STORES) + "."],
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
        if self["store"] not in STORES:
            raise usage.UsageError(
                f"--store must be one of: {', '.join(STORES)} (not {self['store']!r})"
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


def makeService(options, reactor=None):
    """
    Build the broker service from parsed L{Options}.
    """
    if reactor is None:
        from twisted.internet import reactor
    broker = Broker(clock=reactor)
    factory = BrokerFactory(broker, max_line=options["max-line"])
    top = service.MultiService()
    listener = ListenService(reactor, options["listen"], factory)
    listener.setServiceParent(top)
    return top
