"""
The C{twistd caps-broker} command: options and the service they build.
"""

from twisted.application import service
from twisted.cred import credentials, portal, strcred
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from caps import limits
from caps.acl import ACLError, OpenACL, load_acl
from caps.auth import PasswordFile, PasswordFileError, Realm
from caps.broker import (
    ACK_TIMEOUT,
    MAX_DELIVERIES,
    MAX_QUEUE,
    MAX_SUBSCRIPTIONS,
    MAX_UNACKED,
    PREFETCH,
    Broker,
)
from caps.options import positive_int, rate, seconds
from caps.protocol import DEFAULT_MAX_LINE, IDLE_TIMEOUT, BrokerFactory
from caps.store import WINDOW, is_redis, open_store
from caps.store.sqlite import SYNC_MODES

DEFAULT_LISTEN = "tcp:3000:interface=127.0.0.1"
DEFAULT_STORE = "sqlite:caps.sqlite3"

log = Logger()


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "[options]"
    supportedInterfaces = (credentials.IUsernamePassword,)
    longdesc = (
        "Run the CAPS queue broker: newline-delimited JSON over TCP (or any "
        "Twisted server endpoint). See docs/protocol.md."
    )
    optFlags = [
        [
            "no-event-log",
            None,
            "Do not log every published message (EVENT {...}); it costs about a "
            "quarter of the broker's CPU per message.",
        ],
        [
            "redis-durable",
            None,
            "With a Redis store: confirm a publish only once Redis has synced it "
            "to its append-only file (WAITAOF; before Redis 7.2, appendfsync "
            "always is required) and, if it has replicas, one replica has it.",
        ],
        [
            "shared",
            None,
            "With a Redis store: share it with any number of other brokers "
            "started with --shared on the same database; a client may connect "
            "to any of them (docs/scaling.md).",
        ],
    ]
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
            "is on disk), redis://[:PASSWORD@]HOST:PORT/DB (also rediss:// for "
            "TLS, unix://PATH; the password better in $CAPS_REDIS_PASSWORD) "
            "or memory (lost when the broker stops).",
        ],
        [
            "sync",
            None,
            "full",
            "With sqlite: full syncs every commit to disk, so nothing confirmed "
            "is lost even on power loss; normal survives a crash of the broker "
            "but not of the machine.",
        ],
        [
            "queue-window",
            None,
            WINDOW,
            "With sqlite or redis: messages of each queue kept in memory; the "
            "rest of a longer queue waits in the store and is read back as the "
            "queue drains.",
            positive_int,
        ],
        [
            "ack-timeout",
            None,
            ACK_TIMEOUT,
            "Seconds a delivered message may stay unacknowledged before it goes "
            "back to its queue (subscribe's ackTimeout overrides); 0 for never.",
            seconds,
        ],
        [
            "prefetch",
            None,
            PREFETCH,
            "Most unacknowledged messages in flight to one consumer (subscribe's "
            "prefetch overrides).",
            positive_int,
        ],
        [
            "max-deliveries",
            None,
            MAX_DELIVERIES,
            "Deliveries after which a message that comes back goes to its "
            "queue's dead letters (<event>.dead).",
            positive_int,
        ],
        [
            "max-queue",
            None,
            MAX_QUEUE,
            "Most messages one queue may hold; past it publishes are refused "
            "with queue-full.",
            positive_int,
        ],
        [
            "default-ttl",
            None,
            None,
            "Seconds a message may wait in a queue before it goes to the dead "
            "letters, when its publish gives no ttl (default: for ever)",
            seconds,
        ],
        [
            "idle-timeout",
            None,
            IDLE_TIMEOUT,
            "Seconds without a byte from a client (not even a ping) before its "
            "connection is closed; 0 for never.",
            seconds,
        ],
        [
            "acl",
            None,
            None,
            "With --auth: a TOML file saying which clientId may publish, address "
            "and consume what (docs/security.md); default: anything, but only "
            "its own queues.",
        ],
        [
            "max-connections",
            None,
            limits.MAX_CONNECTIONS,
            "Most connections open at once.",
            positive_int,
        ],
        [
            "max-connections-per-address",
            None,
            limits.MAX_PER_ADDRESS,
            "Most connections open at once from one IP address.",
            positive_int,
        ],
        [
            "max-subscriptions",
            None,
            MAX_SUBSCRIPTIONS,
            "Most queues one connection may consume.",
            positive_int,
        ],
        [
            "max-unacked",
            None,
            MAX_UNACKED,
            "Most unacknowledged messages in flight to one connection, all its "
            "subscriptions and getAlls together.",
            positive_int,
        ],
        [
            "max-payload",
            None,
            limits.MAX_PAYLOAD,
            "Most bytes of a published payload (as compact JSON).",
            positive_int,
        ],
        [
            "max-rate",
            None,
            limits.MAX_RATE,
            "Frames a second one connection may send on average (a second's "
            "worth at once); past it frames get rate-limited. 0 for no limit.",
            rate,
        ],
        [
            "line-timeout",
            None,
            limits.LINE_TIMEOUT,
            "Seconds a client may take to finish a line it started; 0 for no limit.",
            seconds,
        ],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["web"] = []

    def opt_auth(self, description):
        kind, _, path = description.partition(":")
        if kind == "memory":
            # strcred's memory: checker keeps str names and passwords, which
            # never equal the bytes of a login's credentials.
            super().opt_auth(description)
            checker = self["credCheckers"][-1]
            checker.users = {
                name.encode("utf-8"): password.encode("utf-8")
                for name, password in checker.users.items()
            }
            return None
        if kind != "file":
            return super().opt_auth(description)
        try:
            checker = PasswordFile(path)
        except PasswordFileError as e:
            raise usage.UsageError(str(e)) from None
        self.addChecker(checker)

    opt_auth.__doc__ = (
        "Require a login, checked by this twisted.cred checker (repeatable): "
        "file:PATH for a file of scrypt hashes made with python -m caps.passwd, "
        "or another of strcred's (--help-auth)."
    )
    opt_a = opt_auth

    def opt_listen(self, description):
        """
        Listen on this server endpoint description (repeatable); default
        tcp:3000:interface=127.0.0.1.
        """
        self["listen"].append(description)

    def opt_web(self, description):
        """
        Serve the web pages, the JSON API and /metrics on this server
        endpoint description (repeatable; e.g. tcp:8080:interface=127.0.0.1);
        default none.
        """
        self["web"].append(description)

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        from twisted.internet import reactor

        for option in ("listen", "web"):
            for description in self[option]:
                try:
                    endpoints.serverFromString(reactor, description)
                except Exception as e:
                    # The ssl: parser reads its files: a missing or bad one
                    # raises OSError, OpenSSL's errors or VerifyError.
                    raise usage.UsageError(
                        f"bad --{option} {description!r}: {e}"
                    ) from None
        kind, _, path = self["store"].partition(":")
        if is_redis(self["store"]):
            if "//" not in self["store"]:
                raise usage.UsageError(
                    "--store redis needs a URL: redis://HOST:PORT/DB"
                )
        elif not (kind == "memory" and not path or kind == "sqlite" and path):
            raise usage.UsageError(
                f"--store must be memory, sqlite:PATH or redis://HOST:PORT/DB "
                f"(not {self['store']!r})"
            )
        if self["redis-durable"] and not is_redis(self["store"]):
            raise usage.UsageError("--redis-durable needs a Redis --store")
        if self["shared"] and not is_redis(self["store"]):
            raise usage.UsageError("--shared needs a Redis --store")
        if self["sync"] not in SYNC_MODES:
            raise usage.UsageError(
                f"--sync must be full or normal (not {self['sync']!r})"
            )
        if self["acl"] is not None:
            if not self.get("credCheckers"):
                raise usage.UsageError("--acl needs --auth")
            try:
                self["acl"] = load_acl(self["acl"])
            except ACLError as e:
                raise usage.UsageError(str(e)) from None


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
    label = "CAPS broker"

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
                "{label} listening on {address}{tls}",
                label=self.label,
                address=_address(port.getHost()),
                tls=" (TLS)" if description.startswith("ssl:") else "",
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


class WebListenService(ListenService):
    """
    Listens for the web site (C{--web}).
    """

    label = "CAPS web"


_LOOPBACK = ("127.", "::1", "localhost")


def _loopback_only(description):
    """
    Whether a server endpoint description listens on loopback only (or on
    a UNIX socket): TCP and TLS endpoints without C{interface=} listen on
    every interface.
    """
    # (Twisted's own parser of descriptions, for their escapes.)
    args, kwargs = endpoints._parse(description)
    if args and args[0] == "unix":
        return True
    return kwargs.get("interface", "").startswith(_LOOPBACK)


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
    Stops the broker's timers and closes the store when the broker stops,
    after the listeners: what is pending is written first.
    """

    def __init__(self, store, broker):
        self.store = store
        self.broker = broker

    def stopService(self):
        super().stopService()
        self.broker.stop()
        return self.store.close()


def makeService(options, reactor=None):
    """
    Build the broker service from parsed L{Options}.

    @raise StoreError: if the store cannot be opened (a one-line reason).
    """
    if reactor is None:
        from twisted.internet import reactor
    if options["shared"]:
        from caps.sharedbroker import SharedBroker
        from caps.store.shared import SharedStore

        store = SharedStore.open(
            options["store"], reactor, durable=options["redis-durable"]
        )
        make = SharedBroker
    else:
        store = open_store(
            options["store"],
            reactor,
            sync=options["sync"],
            window=options["queue-window"],
            durable=options["redis-durable"],
        )
        make = Broker
    broker = make(
        clock=reactor,
        store=store,
        ack_timeout=options["ack-timeout"],
        prefetch=options["prefetch"],
        max_deliveries=options["max-deliveries"],
        max_queue=options["max-queue"],
        max_subscriptions=options["max-subscriptions"],
        max_unacked=options["max-unacked"],
        default_ttl=options["default-ttl"] or None,
        log_events=not options["no-event-log"],
    )
    checkers = options.get("credCheckers") or []
    if checkers:
        guard = portal.Portal(Realm(options["acl"] or OpenACL()), checkers)
    else:
        guard = None
        everywhere = options["listen"] + options["web"]
        exposed = [d for d in everywhere if not _loopback_only(d)]
        log.warn(
            "CAPS broker is OPEN: no --auth, so anyone who can connect may act "
            "as any clientId. Listening on {listen}.{exposed}",
            listen=", ".join(everywhere),
            exposed=(f" NOT loopback only: {', '.join(exposed)}" if exposed else ""),
        )
    factory = BrokerFactory(
        broker,
        max_line=options["max-line"],
        idle_timeout=options["idle-timeout"],
        portal=guard,
        limits=limits.Limits(
            max_connections=options["max-connections"],
            max_per_address=options["max-connections-per-address"],
            max_payload=options["max-payload"],
            rate=options["max-rate"],
            line_timeout=options["line-timeout"],
        ),
    )
    top = service.MultiService()
    StoreService(store, broker).setServiceParent(top)
    ListenService(reactor, options["listen"], factory).setServiceParent(top)
    if options["web"]:
        WebListenService(
            reactor,
            options["web"],
            _web_site(reactor, broker, guard, factory.admission),
        ).setServiceParent(top)
    return top


def _web_site(reactor, broker, guard, admission):
    """
    The web site (C{--web}), with C{/metrics}; its failed logins count
    with the broker's.
    """
    from caps.metrics import metrics_resource
    from caps.web import make_site

    return make_site(
        broker,
        portal=guard,
        metrics=metrics_resource(broker, reactor),
        admission=admission,
    )
