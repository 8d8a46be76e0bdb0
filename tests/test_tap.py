"""
Tests for caps.tap (the twistd options and service) and the plugin that
points twistd at it.
"""

import os
import tempfile

from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caps import tap
from caps.auth import PasswordFile, hash_password
from caps.protocol import BrokerFactory


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        """Without options: loopback port 3000, 64 KiB lines, SQLite in the working directory, fully synced."""
        options = self.parse()
        self.assertEqual(options["listen"], ["tcp:3000:interface=127.0.0.1"])
        self.assertEqual(options["max-line"], 65536)
        self.assertEqual(options["store"], "sqlite:caps.sqlite3")
        self.assertEqual(options["sync"], "full")

    def test_listen_repeats(self):
        """--listen may be given several times, replacing the default."""
        options = self.parse("--listen", "tcp:4000", "--listen", "unix:/tmp/caps.sock")
        self.assertEqual(options["listen"], ["tcp:4000", "unix:/tmp/caps.sock"])

    def test_max_line_is_a_number(self):
        """--max-line arrives as an int, and must be positive."""
        self.assertEqual(self.parse("--max-line", "1024")["max-line"], 1024)
        for bad in ("0", "-5", "big"):
            self.assertRaises(usage.UsageError, self.parse, "--max-line", bad)

    def test_bad_store(self):
        """An unknown store, or sqlite without a path, is refused with the forms that work."""
        for bad in ("mongodb", "sqlite", "sqlite:", "memory:x"):
            e = self.assertRaises(usage.UsageError, self.parse, "--store", bad)
            self.assertIn("memory, sqlite:PATH or redis://HOST:PORT/DB", str(e))

    def test_shared_needs_redis(self):
        """--shared is refused without a Redis store, accepted with one."""
        for store in ("memory", "sqlite:x.db"):
            e = self.assertRaises(
                usage.UsageError, self.parse, "--store", store, "--shared"
            )
            self.assertEqual(str(e), "--shared needs a Redis --store")
        self.assertTrue(
            self.parse("--store", "redis://127.0.0.1:1/0", "--shared")["shared"]
        )

    def test_queue_window(self):
        """--queue-window sets how much of each queue the SQLite store keeps in memory."""
        self.assertEqual(self.parse()["queue-window"], 10_000)
        self.assertEqual(self.parse("--queue-window", "50")["queue-window"], 50)
        self.assertRaises(usage.UsageError, self.parse, "--queue-window", "0")

    def test_sync(self):
        """--sync takes full or normal and nothing else."""
        self.assertEqual(self.parse("--sync", "normal")["sync"], "normal")
        e = self.assertRaises(usage.UsageError, self.parse, "--sync", "off")
        self.assertIn("full or normal", str(e))

    def test_bad_listen(self):
        """A malformed endpoint description is refused before anything starts."""
        e = self.assertRaises(
            usage.UsageError, self.parse, "--listen", "carrier-pigeon:1"
        )
        self.assertIn("carrier-pigeon:1", str(e))


class _RefusingReactor(MemoryReactor):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class ServiceTests(SynchronousTestCase):
    def make(self, reactor, *argv):
        options = tap.Options()
        options.parseOptions(["--store", "memory", *argv])
        return tap.makeService(options, reactor=reactor)

    def test_listens_where_told(self):
        """The service listens on every --listen endpoint with the broker factory and line limit."""
        reactor = MemoryReactor()
        service = self.make(
            reactor,
            "--listen",
            "tcp:4000:interface=127.0.0.1",
            "--listen",
            "tcp:4001",
            "--max-line",
            "100",
        )
        service.startService()
        self.assertEqual(
            [(p[0], p[3]) for p in reactor.tcpServers],
            [(4000, "127.0.0.1"), (4001, "")],
        )
        factory = reactor.tcpServers[0][1]
        self.assertIsInstance(factory, BrokerFactory)
        self.assertEqual(factory.max_line, 100)
        self.assertIs(reactor.tcpServers[1][1], factory)
        self.successResultOf(service.stopService())

    def test_broker_options(self):
        """Delivery-control options and --no-event-log reach the broker."""
        service = self.make(
            MemoryReactor(),
            "--ack-timeout",
            "5",
            "--prefetch",
            "7",
            "--max-deliveries",
            "3",
            "--max-queue",
            "100",
            "--default-ttl",
            "60",
            "--no-event-log",
        )
        [store_service, listener] = list(service)
        broker = store_service.broker
        self.assertEqual(
            (
                broker.ack_timeout,
                broker.prefetch,
                broker.max_deliveries,
                broker.max_queue,
                broker.default_ttl,
                broker.log_events,
            ),
            (5.0, 7, 3, 100, 60.0, False),
        )

    def test_limits(self):
        """The limit options reach the broker and the connection factory."""
        service = self.make(
            MemoryReactor(),
            "--max-connections",
            "11",
            "--max-connections-per-address",
            "12",
            "--max-subscriptions",
            "13",
            "--max-unacked",
            "14",
            "--max-payload",
            "15",
            "--max-rate",
            "16.5",
            "--line-timeout",
            "17",
        )
        [store_service, listener] = list(service)
        broker = store_service.broker
        limits = listener.factory.limits
        self.assertEqual(
            (
                limits.max_connections,
                limits.max_per_address,
                broker.max_subscriptions,
                broker.max_unacked,
                limits.max_payload,
                limits.rate,
                limits.line_timeout,
            ),
            (11, 12, 13, 14, 15, 16.5, 17.0),
        )
        for bad in (("--max-rate", "-1"), ("--max-unacked", "0")):
            self.assertRaises(usage.UsageError, self.make, MemoryReactor(), *bad)

    def test_open_broker_warns(self):
        """Without --auth the broker warns that it is open; with it, it does not, and a login is needed."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = self.make(MemoryReactor())
        self.assertIsNone(list(service)[1].factory.portal)
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("CAPS broker is OPEN", warnings[0])
        self.assertIn("tcp:3000:interface=127.0.0.1", warnings[0])
        self.assertNotIn("NOT loopback", warnings[0])
        del events[:]
        self.make(
            MemoryReactor(),
            "--listen",
            "unix:/tmp/caps.sock",
            "--listen",
            r"tcp6:3000:interface=\:\:1",
            "--listen",
            "tcp:3001",
        )
        [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("NOT loopback only: tcp:3001", warning)
        self.assertNotIn("::1,", warning.split("NOT")[1])
        del events[:]
        service = self.make(MemoryReactor(), "--auth", "memory:acme:secret")
        self.assertIsNotNone(list(service)[1].factory.portal)
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])

    def test_auth_memory(self):
        """--auth memory: (strcred's, for tests) accepts the logins it lists."""
        from twisted.cred.credentials import UsernamePassword
        from twisted.cred.error import UnauthorizedLogin

        options = tap.Options()
        options.parseOptions(["--auth", "memory:acme:secret"])
        [checker] = options["credCheckers"]
        self.assertEqual(
            self.successResultOf(
                checker.requestAvatarId(UsernamePassword(b"acme", b"secret"))
            ),
            b"acme",
        )
        self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"acme", b"wrong")),
            UnauthorizedLogin,
        )

    def test_auth_and_acl(self):
        """--auth file: reads a password file of hashes, --acl a TOML file; bad ones are usage errors."""
        scratch = tempfile.TemporaryDirectory(prefix="caps-tap-")
        self.addCleanup(scratch.cleanup)
        passwords = os.path.join(scratch.name, "passwords.txt")
        with open(passwords, "w") as f:
            f.write(f"acme:{hash_password('secret-pw', n=16)}\n")
        acl = os.path.join(scratch.name, "acl.toml")
        with open(acl, "w") as f:
            f.write('[acme]\nconsume = ["delivered"]\n')
        options = tap.Options()
        options.parseOptions(["--auth", f"file:{passwords}", "--acl", acl])
        [checker] = options["credCheckers"]
        self.assertIsInstance(checker, PasswordFile)
        permissions = options["acl"].permissions("acme")
        self.assertIsNone(permissions.consume_refusal("acme", "delivered"))
        self.assertIsNotNone(permissions.publish_refusal("pickup", ()))
        with open(acl, "w") as f:
            f.write("[acme]\nconsume = 1\n")
        for argv, mentions in (
            (["--auth", f"file:{acl}x"], "cannot read password file"),
            (["--auth", f"file:{acl}"], "not clientId:scrypt$"),
            (["--auth", f"file:{passwords}", "--acl", acl], "list of strings"),
            (["--acl", acl], "--acl needs --auth"),
        ):
            e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, argv)
            self.assertIn(mentions, str(e))

    def test_queue_window_reaches_the_store(self):
        """--queue-window reaches the SQLite store the broker runs on."""
        scratch = tempfile.TemporaryDirectory(prefix="caps-tap-")
        self.addCleanup(scratch.cleanup)
        path = os.path.join(scratch.name, "caps.sqlite3")
        service = self.make(
            MemoryReactorClock(), "--store", f"sqlite:{path}", "--queue-window", "50"
        )
        [store_service, listener] = list(service)
        self.addCleanup(lambda: store_service.broker.store.close())
        self.assertEqual(store_service.broker.store.window, 50)

    def test_cannot_listen(self):
        """A port that cannot be had stops the start with a one-line reason, not a traceback."""
        service = self.make(_RefusingReactor())
        e = self.assertRaises(tap.ListenError, service.privilegedStartService)
        self.assertIsInstance(e, SystemExit)
        self.assertIn("cannot listen on tcp:3000:interface=127.0.0.1", str(e))
        self.assertIn("Address already in use", str(e))


class AddressTests(SynchronousTestCase):
    def test_addresses(self):
        """Bound addresses are logged as host:port, [v6]:port, or the socket path."""
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        self.assertEqual(
            tap._address(IPv4Address("TCP", "127.0.0.1", 3000)), "127.0.0.1:3000"
        )
        self.assertEqual(tap._address(IPv6Address("TCP", "::1", 3000)), "[::1]:3000")
        self.assertEqual(tap._address(UNIXAddress(b"/tmp/caps.sock")), "/tmp/caps.sock")


class PluginTests(SynchronousTestCase):
    def test_plugin_listed(self):
        """twistd finds caps-broker among its plugins, pointing at caps.tap."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("caps-broker", makers)
        self.assertEqual(makers["caps-broker"].module, "caps.tap")
        self.assertIs(makers["caps-broker"].options, tap.Options)
