"""
Logging in and permissions: the login frame, the guard on every other
frame, failed logins slowed down per address, the password file, the ACL
file and the caps.passwd command.
"""

import io
import os
import re
import stat
import subprocess
import sys
import tempfile

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from caps import passwd
from caps.acl import ACLError, OpenACL, parse_acl
from caps.auth import (
    PasswordFile,
    PasswordFileError,
    Realm,
    check_password,
    hash_password,
)
from caps.broker import Broker
from caps.gate import LOGIN_DELAY, LOGIN_DELAY_MAX, MAX_LOGIN_FAILURES
from caps.protocol import BrokerFactory

from .processes import RunningBroker
from .test_protocol import Client, frame

PASSWORDS = {
    "acme-widgets": "acme-password",
    "flowers-r-us": "flowers-password",
    "driver": "driver-password",
    "dashboard": "dashboard-password",
}

ACL = """
["acme-*"]
publish = ["pickup"]
to = ["driver"]
consume = ["delivered", "in-transit"]

[flowers-r-us]
publish = ["pickup"]
to = ["driver"]
consume = ["delivered", "in-transit"]

[driver]
publish = ["in-transit", "delivered"]
to = ["*"]
consume = ["pickup"]

[dashboard]
consume = ["*"]
observe = ["*"]
"""


def memory_checker():
    return InMemoryUsernamePasswordDatabaseDontUse(
        **{client: password.encode() for client, password in PASSWORDS.items()}
    )


class _AuthCase(SynchronousTestCase):
    acl = None

    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock)
        self.portal = Portal(
            Realm(parse_acl(self.acl) if self.acl else OpenACL()), [memory_checker()]
        )
        self.factory = BrokerFactory(self.broker, portal=self.portal)
        self.ports = iter(range(40000, 50000))

    def connect(self, host="127.0.0.1"):
        return Client(self.factory, next(self.ports), host)

    def login(self, client_id, password=None, host="127.0.0.1"):
        client = self.connect(host)
        client.send(
            frame(
                "login",
                {"clientId": client_id, "password": password or PASSWORDS[client_id]},
                id="login",
            )
        )
        [reply] = client.frames()
        self.assertEqual(
            reply,
            {
                "event": "ok",
                "payload": {"clientId": client_id, "authenticated": True},
                "id": "login",
            },
        )
        return client

    def answer(self, client, data):
        client.send(data)
        [reply] = client.frames()
        return reply

    def code(self, client, data):
        reply = self.answer(client, data)
        if reply["event"] == "error":
            return reply["payload"]["code"]
        return reply["event"]


class LoginTests(_AuthCase):
    def test_every_frame_needs_a_login(self):
        """Before a login, every frame but login gets unauthenticated and changes nothing."""
        self.broker.publish("delivered", {}, b"{}", ("acme-widgets",))
        client = self.connect()
        for data in (
            frame("ping", id=1),
            frame(
                "subscribe", {"clientId": "acme-widgets", "event": "delivered"}, id=1
            ),
            frame(
                "unsubscribe", {"clientId": "acme-widgets", "event": "delivered"}, id=1
            ),
            frame("getAll", {"clientId": "acme-widgets", "event": "delivered"}, id=1),
            frame(
                "received",
                {"clientId": "acme-widgets", "event": "delivered", "messageId": "m"},
                id=1,
            ),
            frame(
                "nack",
                {"clientId": "acme-widgets", "event": "delivered", "messageId": "m"},
                id=1,
            ),
            frame("requeue", {"clientId": "acme-widgets", "event": "delivered"}, id=1),
            frame("delivered", {"n": 1}, to="acme-widgets", id=1),
        ):
            reply = self.answer(client, data)
            self.assertEqual(
                (reply["event"], reply["payload"]["code"], reply["id"]),
                ("error", "unauthenticated", 1),
                data,
            )
        self.assertEqual(len(self.broker.queue("acme-widgets", "delivered")), 1)

    def test_login_then_work(self):
        """After a login, the client works on its own queues."""
        client = self.login("acme-widgets")
        self.assertEqual(
            self.code(
                client,
                frame("subscribe", {"clientId": "acme-widgets", "event": "d"}, id=2),
            ),
            "ok",
        )

    def test_second_login_refused(self):
        """A connection stays the clientId it logged in as."""
        client = self.login("acme-widgets")
        data = frame("login", {"clientId": "driver", "password": PASSWORDS["driver"]})
        self.assertEqual(self.code(client, data), "already-logged-in")

    def test_open_broker_login(self):
        """Without --auth, a login is answered ok and checks nothing."""
        factory = BrokerFactory(self.broker)
        client = Client(factory, 1234)
        reply = self.answer(
            client, frame("login", {"clientId": "x", "password": "anything"}, id=1)
        )
        self.assertEqual(reply["payload"], {"clientId": "x", "authenticated": False})
        self.assertEqual(self.code(client, frame("ping", id=2)), "pong")

    def test_wrong_password_answered_late(self):
        """A failed login is answered only after a delay, and nothing else gets through meanwhile."""
        client = self.connect()
        client.send(frame("login", {"clientId": "driver", "password": "guess"}, id=1))
        client.send(frame("login", {"clientId": "driver", "password": "guess2"}, id=2))
        # The second login is refused at once, but queued behind the first.
        self.assertEqual(client.frames(), [])
        self.clock.advance(LOGIN_DELAY - 0.01)
        self.assertEqual(client.frames(), [])
        self.clock.advance(0.01)
        replies = client.frames()
        self.assertEqual(
            [(r["id"], r["payload"]["code"]) for r in replies],
            [(1, "login-failed"), (2, "unauthenticated")],
        )
        self.assertFalse(client.transport.disconnecting)

    def test_closed_after_failures(self):
        """The connection closes after the last allowed failed login is answered."""
        client = self.connect()
        delay = LOGIN_DELAY
        for attempt in range(1, MAX_LOGIN_FAILURES + 1):
            client.send(
                frame("login", {"clientId": "driver", "password": "no"}, id=attempt)
            )
            self.clock.advance(delay)
            [reply] = client.frames()
            self.assertEqual(reply["payload"]["code"], "login-failed")
            self.assertEqual(
                client.transport.disconnecting, attempt == MAX_LOGIN_FAILURES
            )
            delay *= 2

    def test_failures_slow_the_address(self):
        """Failed logins from one address make the next ones from there wait longer, on new connections too; other addresses are not slowed."""
        delays = []
        for _ in range(7):
            client = self.connect("10.0.0.1")
            client.send(frame("login", {"clientId": "driver", "password": "no"}))
            waited = 0.0
            while not client.frames():
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1, 2, 4, 8, 16, LOGIN_DELAY_MAX, LOGIN_DELAY_MAX])
        other = self.connect("10.0.0.2")
        other.send(frame("login", {"clientId": "driver", "password": "no"}))
        self.clock.advance(LOGIN_DELAY)
        self.assertEqual(len(other.frames()), 1)

    def test_unknown_client(self):
        """An unknown clientId fails like a wrong password."""
        client = self.connect()
        client.send(frame("login", {"clientId": "nobody", "password": "x"}, id=1))
        self.clock.advance(LOGIN_DELAY)
        [reply] = client.frames()
        self.assertEqual(reply["payload"]["code"], "login-failed")
        self.assertEqual(reply["payload"]["message"], "wrong clientId or password")

    def test_passwords_never_logged(self):
        """Neither a right nor a wrong password appears in any log event."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.login("driver")
        client = self.connect()
        client.send(frame("login", {"clientId": "driver", "password": "hunter2-x"}))
        client.send(frame("login", {"clientId": "driver", "password": "\ud800"}))
        self.clock.advance(LOGIN_DELAY)
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("failed to log in as driver", text)
        self.assertNotIn(PASSWORDS["driver"], text)
        self.assertNotIn("hunter2-x", text)

    def test_bad_login_frames(self):
        """A login frame without a usable clientId or password gets bad-frame or bad-name."""
        client = self.connect()
        for payload, code in (
            ({}, "bad-frame"),
            ({"clientId": "driver"}, "bad-frame"),
            ({"clientId": "driver", "password": ""}, "bad-frame"),
            ({"clientId": "driver", "password": 5}, "bad-frame"),
            ({"clientId": "driver", "password": "x" * 1025}, "bad-frame"),
            ({"clientId": "driver", "password": "\ud800"}, "bad-frame"),
            ({"clientId": "no spaces", "password": "x"}, "bad-name"),
        ):
            self.assertEqual(
                self.code(client, frame("login", payload, id=1)), code, payload
            )


# Every frame that names a queue, with the queue filled in by test.
QUEUE_FRAMES = {
    "subscribe": {},
    "unsubscribe": {},
    "getAll": {},
    "received": {"messageId": "m"},
    "nack": {"messageId": "m"},
    "requeue": {},
}


class OpenACLTests(_AuthCase):
    """
    With --auth and no ACL: anything may be published, but each client
    consumes only its own queues.
    """

    def test_own_queues_only(self):
        """Every frame naming a queue is forbidden for another clientId's queue, allowed for one's own."""
        client = self.login("acme-widgets")
        for name, extra in QUEUE_FRAMES.items():
            for owner, expected in (
                ("acme-widgets", "ok"),
                ("flowers-r-us", "forbidden"),
            ):
                for event in ("delivered", "delivered.dead"):
                    if name == "requeue" and event.endswith(".dead"):
                        continue
                    payload = {"clientId": owner, "event": event, **extra}
                    self.assertEqual(
                        self.code(client, frame(name, payload, id=1)),
                        expected,
                        (name, owner, event),
                    )

    def test_publish_anything(self):
        """Any event may be published to any clientId."""
        client = self.login("acme-widgets")
        data = frame("delivered", {"n": 1}, to=["flowers-r-us", "driver"], id=1)
        self.assertEqual(self.code(client, data), "ok")


class ACLTests(_AuthCase):
    acl = ACL

    def test_consume_rules(self):
        """The ACL decides, for every frame naming a queue, whose queues and which events a client may use."""
        cases = [
            # (who, queue owner, event, allowed)
            ("acme-widgets", "acme-widgets", "delivered", True),
            ("acme-widgets", "acme-widgets", "in-transit", True),
            ("acme-widgets", "acme-widgets", "delivered.dead", True),
            ("acme-widgets", "acme-widgets", "pickup", False),
            ("acme-widgets", "flowers-r-us", "delivered", False),
            ("driver", "driver", "pickup", True),
            ("driver", "driver", "delivered", False),
            ("driver", "acme-widgets", "pickup", False),
            ("dashboard", "acme-widgets", "delivered", True),
            ("dashboard", "driver", "pickup", True),
            ("dashboard", "dashboard", "anything", True),
        ]
        clients = {}
        for who, owner, event, allowed in cases:
            if who not in clients:
                clients[who] = self.login(who)
            for name, extra in QUEUE_FRAMES.items():
                if name == "requeue" and event.endswith(".dead"):
                    continue
                payload = {"clientId": owner, "event": event, **extra}
                self.assertEqual(
                    self.code(clients[who], frame(name, payload, id=1)),
                    "ok" if allowed else "forbidden",
                    (who, name, owner, event),
                )

    def test_publish_rules(self):
        """The ACL decides which events a client may publish and to whom."""
        cases = [
            ("acme-widgets", "pickup", ["driver"], True),
            ("acme-widgets", "pickup", [], True),
            ("acme-widgets", "pickup", ["flowers-r-us"], False),
            ("acme-widgets", "pickup", ["driver", "flowers-r-us"], False),
            ("acme-widgets", "delivered", ["acme-widgets"], False),
            ("driver", "delivered", ["acme-widgets"], True),
            ("driver", "in-transit", ["flowers-r-us"], True),
            ("driver", "pickup", ["driver"], False),
            ("dashboard", "pickup", [], False),
        ]
        clients = {}
        for who, event, to, allowed in cases:
            if who not in clients:
                clients[who] = self.login(who)
            reply = self.answer(clients[who], frame(event, {"n": 1}, to=to, id=1))
            code = reply["payload"]["code"] if reply["event"] == "error" else "ok"
            self.assertEqual(code, "ok" if allowed else "forbidden", (who, event, to))
        # Nothing refused reached a queue.
        self.assertIsNone(self.broker.queue("flowers-r-us", "pickup"))
        self.assertEqual(len(self.broker.queue("driver", "pickup")), 1)
        self.assertEqual(len(self.broker.queue("acme-widgets", "delivered")), 1)

    def test_unlisted_client(self):
        """A clientId no ACL table matches may log in and ping, and nothing else."""
        self.portal.registerChecker(
            InMemoryUsernamePasswordDatabaseDontUse(stranger=b"stranger-pw")
        )
        client = self.login("stranger", "stranger-pw")
        self.assertEqual(self.code(client, frame("ping", id=1)), "pong")
        self.assertEqual(
            self.code(
                client, frame("subscribe", {"clientId": "stranger", "event": "e"}, id=1)
            ),
            "forbidden",
        )
        self.assertEqual(self.code(client, frame("e", {}, id=1)), "forbidden")


class ACLFileTests(SynchronousTestCase):
    def test_union_of_tables(self):
        """A clientId gets what every matching table grants."""
        acl = parse_acl('["*"]\nconsume = ["a"]\n["x-*"]\nconsume = ["b"]\n')
        permissions = acl.permissions("x-1")
        self.assertIsNone(permissions.consume_refusal("x-1", "a"))
        self.assertIsNone(permissions.consume_refusal("x-1", "b"))
        self.assertIsNotNone(acl.permissions("y").consume_refusal("y", "b"))

    def test_sees(self):
        """A client sees its own clientId and those it may observe; only observe = ["*"] sees all."""
        acl = parse_acl(ACL)
        dashboard, acme = acl.permissions("dashboard"), acl.permissions("acme-widgets")
        self.assertTrue(dashboard.sees("acme-widgets"))
        self.assertTrue(dashboard.sees_all)
        self.assertTrue(acme.sees("acme-widgets"))
        self.assertFalse(acme.sees("flowers-r-us"))
        self.assertFalse(acme.sees_all)

    def test_errors(self):
        """A malformed ACL is refused with a message saying what is wrong."""
        for text, mentions in (
            ("[a\n", "ACL"),
            ('publish = ["x"]\n', "must be a table"),
            ('[a]\npublsh = ["x"]\n', "unknown key(s) publsh"),
            ('[a]\npublish = "x"\n', "must be a list of strings"),
            ("[a]\npublish = [1]\n", "must be a list of strings"),
        ):
            with self.assertRaises(ACLError) as caught:
                parse_acl(text)
            self.assertIn(mentions, str(caught.exception))


class PasswordFileTests(SynchronousTestCase):
    def setUp(self):
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.path = os.path.join(directory.name, "passwords.txt")
        self.write({"acme-widgets": "right-password"})

    def write(self, entries):
        with open(self.path, "w") as f:
            for client_id, password in entries.items():
                # A cheap scrypt: the parameters are stored with the hash.
                f.write(f"{client_id}:{hash_password(password, n=16)}\n")

    def checker(self):
        return PasswordFile(
            self.path, check=lambda p, s: defer.succeed(check_password(p, s))
        )

    def attempt(self, checker, client_id, password):
        return checker.requestAvatarId(
            UsernamePassword(client_id.encode(), password.encode())
        )

    def test_right_and_wrong(self):
        """The right password gives the clientId; a wrong one or an unknown clientId fails."""
        checker = self.checker()
        self.assertEqual(
            self.successResultOf(
                self.attempt(checker, "acme-widgets", "right-password")
            ),
            b"acme-widgets",
        )
        self.failureResultOf(
            self.attempt(checker, "acme-widgets", "wrong"), UnauthorizedLogin
        )
        self.failureResultOf(
            self.attempt(checker, "nobody", "right-password"), UnauthorizedLogin
        )

    def test_reread_on_change(self):
        """A changed file takes effect at the next login; a broken one keeps the last good entries."""
        checker = self.checker()
        self.write({"acme-widgets": "new-password"})
        os.utime(self.path, ns=(1, 1))
        self.successResultOf(self.attempt(checker, "acme-widgets", "new-password"))
        with open(self.path, "w") as f:
            f.write("garbage\n")
        os.utime(self.path, ns=(2, 2))
        self.successResultOf(self.attempt(checker, "acme-widgets", "new-password"))
        self.flushLoggedErrors()

    def test_malformed_at_start(self):
        """A malformed file is refused at start, naming the line."""
        with open(self.path, "a") as f:
            f.write("acme-widgets:plaintext\n")
        with self.assertRaises(PasswordFileError) as caught:
            self.checker()
        self.assertIn("line 2", str(caught.exception))

    def test_hash_format(self):
        """Stored hashes are salted scrypt: the same password hashes differently each time."""
        a, b = (
            hash_password("same-password", n=16),
            hash_password("same-password", n=16),
        )
        self.assertNotEqual(a, b)
        self.assertTrue(a.startswith("scrypt$16$8$1$"))
        self.assertTrue(check_password(b"same-password", a))
        self.assertFalse(check_password(b"same-password", "scrypt$16$8$1$!$!"))


class PasswdCommandTests(SynchronousTestCase):
    def setUp(self):
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.path = os.path.join(directory.name, "passwords.txt")

    def run_command(self, *argv, stdin=""):
        out = io.StringIO()
        passwd.main(list(argv), stdin=io.StringIO(stdin), stdout=out)
        return out.getvalue()

    def test_add_change_delete(self):
        """Entries are added, changed and deleted, others kept, and the file is private."""
        self.assertEqual(
            self.run_command("--stdin", self.path, "acme", stdin="first-pass\n"),
            f"added acme in {self.path}\n",
        )
        self.run_command("--stdin", self.path, "driver", stdin="driver-pass\n")
        self.assertEqual(
            self.run_command("--stdin", self.path, "acme", stdin="second-pass\n"),
            f"changed acme in {self.path}\n",
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        checker = PasswordFile(
            self.path, check=lambda p, s: defer.succeed(check_password(p, s))
        )
        for client_id, password, ok in (
            ("acme", "second-pass", True),
            ("acme", "first-pass", False),
            ("driver", "driver-pass", True),
        ):
            d = checker.requestAvatarId(
                UsernamePassword(client_id.encode(), password.encode())
            )
            if ok:
                self.successResultOf(d)
            else:
                self.failureResultOf(d, UnauthorizedLogin)
        self.run_command("--delete", self.path, "acme")
        with open(self.path) as f:
            self.assertEqual([line.split(":")[0] for line in f], ["driver"])

    def test_refusals(self):
        """A short password, a bad clientId or deleting a missing entry is refused without changing the file."""
        with self.assertRaises(SystemExit):
            self.run_command("--stdin", self.path, "acme", stdin="short\n")
        self.assertFalse(os.path.exists(self.path))
        with self.assertRaises(SystemExit):
            self.run_command("--stdin", self.path, "not valid", stdin="long-enough\n")
        with self.assertRaises(SystemExit):
            self.run_command("--delete", self.path, "nobody")


class TwistdAuthTests(SynchronousTestCase):
    """
    The real broker with --auth file: and --acl, and the real vendor and
    driver apps logging in with --password-file, as processes on 127.0.0.1.
    """

    def setUp(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-auth-")
        self.addCleanup(scratch.cleanup)
        self.dir = scratch.name
        self.passwords = os.path.join(self.dir, "passwords.txt")
        for client_id in ("acme-widgets", "driver"):
            passwd.main(
                ["--stdin", self.passwords, client_id],
                stdin=io.StringIO(PASSWORDS[client_id] + "\n"),
                stdout=io.StringIO(),
            )
        acl = os.path.join(self.dir, "acl.toml")
        with open(acl, "w") as f:
            f.write(ACL)
        self.broker = RunningBroker(
            "memory", "--auth", f"file:{self.passwords}", "--acl", acl
        )
        self.addCleanup(self.broker.stop)

    def app(self, module, password, *args):
        path = os.path.join(self.dir, f"{module}-{len(os.listdir(self.dir))}.pw")
        with open(path, "w") as f:
            f.write(password + "\n")
        host, port = self.broker.address
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"caps.{module}",
                "--broker",
                f"tcp:{host}:{port}",
                "--password-file",
                path,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(_stop, process)
        return process

    def test_apps_log_in_and_deliver(self):
        """A vendor and a driver with their passwords get an order placed, delivered and thanked for; no password reaches the broker's log."""
        driver = self.app(
            "driver", PASSWORDS["driver"], "--orders", "1", "--delay", "0.2"
        )
        vendor = self.app("vendor", PASSWORDS["acme-widgets"], "--orders", "1")
        out, err = vendor.communicate(timeout=60)
        self.assertEqual(vendor.returncode, 0, err)
        self.assertIn("Thank you for delivering", out)
        driver.communicate(timeout=30)
        self.assertEqual(driver.returncode, 0)
        log = self.broker.text()
        self.assertIn("logged in as acme-widgets", log)
        self.assertIn("logged in as driver", log)
        for password in PASSWORDS.values():
            self.assertNotIn(password, log)

    def test_wrong_password(self):
        """A vendor with a wrong password says the login was refused and places no order."""
        vendor = self.app("vendor", "not-the-password", "--orders", "1")
        # The answer comes after the delay; the app then reports it and
        # drops the connection.
        self.broker.wait_for(re.compile(r"failed to log in(.|\n)*disconnected"))
        vendor.terminate()
        out, err = vendor.communicate(timeout=30)
        self.assertIn("refused the login as acme-widgets", err)
        self.assertIn("login-failed", err)
        self.assertNotIn("not-the-password", self.broker.text())
        self.assertNotIn("placed order", out)


def _stop(process):
    if process.poll() is None:
        process.kill()
        process.communicate()
