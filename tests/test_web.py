"""
Tests for the web site (caps.web): the JSON API, the pages, HTTP basic
authentication with per-client permissions, the server-sent events stream,
and the --web option.  HTTP runs in memory: the real site's protocol on a
StringTransport, the broker on a task.Clock.
"""

import base64
import http.client
import json
import os
import re
import signal
import tempfile

from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource
from twisted.web.guard import HTTPAuthSessionWrapper
from zope.interface import implementer

from caps import tap
from caps.acl import parse_acl
from caps.auth import Realm, hash_password
from caps.broker import Broker
from caps.gate import LOGIN_DELAY_MAX
from caps.monitor import Monitor
from caps.web import make_site
from caps.web.site import WebSite
from tests.helpers import RecordingConnection
from tests.processes import RunningBroker, read, send

ACL = """
["acme"]
consume = ["*"]

["globex"]
consume = ["*"]

[ops]
consume = ["*"]
observe = ["*"]
"""
PASSWORDS = {"acme": b"acme-pw", "globex": b"globex-pw", "ops": b"ops-pw"}
WEB_LISTENING = re.compile(r"CAPS web listening on (\S+)")
PAGES = {
    "operator.html": b"<!doctype html><title>operator</title>",
    "store.html": b"<!doctype html><title>store</title>",
    "app.js": b"console.log('hi');\n",
}


class Response:
    """
    What the site wrote on one connection, parsed: status, headers, body
    (chunks joined).
    """

    def __init__(self, channel, transport):
        self.channel = channel
        self.transport = transport

    def _parse(self):
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower().decode(), []).append(
                value.strip().decode()
            )
        if headers.get("transfer-encoding") == ["chunked"]:
            body = b""
            while b"\r\n" in rest:
                size, _, rest = rest.partition(b"\r\n")
                size = int(size, 16)
                if size == 0 or len(rest) < size + 2:
                    break
                body, rest = body + rest[:size], rest[size + 2 :]
            rest = body
        return int(status.split()[1]), headers, rest

    @property
    def status(self):
        return self._parse()[0]

    def header(self, name):
        values = self._parse()[1].get(name)
        return values[0] if values else None

    @property
    def body(self):
        return self._parse()[2]

    def json(self):
        return json.loads(self.body)

    def events(self):
        """
        The server-sent events so far, as dicts of their fields.
        """
        found = []
        for block in self.body.decode("utf-8").split("\n\n"):
            if not block:
                continue
            fields = {}
            for line in block.split("\n"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
            found.append(fields)
        return found

    def messages(self):
        return [
            (int(e["id"]), json.loads(e["data"]))
            for e in self.events()
            if e.get("event") == "message"
        ]

    def close(self):
        """
        The client goes away.
        """
        self.channel.connectionLost(Failure(ConnectionDone()))


class _WebCase(SynchronousTestCase):
    portal = None

    def setUp(self):
        self.clock = task.Clock()
        self.broker = Broker(self.clock, log_events=False)
        self.addCleanup(self.broker.stop)
        scratch = tempfile.TemporaryDirectory(prefix="caps-web-")
        self.addCleanup(scratch.cleanup)
        self.static = scratch.name
        for name, content in PAGES.items():
            with open(os.path.join(self.static, name), "wb") as f:
                f.write(content)
        self.metrics = resource.Resource()
        self.metrics.putChild(b"", resource.Resource())
        self.site = make_site(
            self.broker,
            portal=self.portal,
            metrics=_Text(b"caps_published_total 0\n"),
            static_dir=self.static,
        )
        self.open = []

    def tearDown(self):
        for response in self.open:
            response.close()
        self.assertEqual(self.broker.monitor.listeners, set())
        self.assertEqual(self.broker.monitor.watchers, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def request(
        self, method, path, user=None, headers=(), host="127.0.0.1:8080", password=None
    ):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
        if user is not None:
            password = password or PASSWORDS.get(user, b"x")
            secret = base64.b64encode(f"{user}:".encode() + password)
            lines.append(f"Authorization: Basic {secret.decode()}")
        if method == "POST":
            lines.append("Content-Length: 0")
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        response = Response(channel, transport)
        self.open.append(response)
        return response

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def publish(self, to, event="delivered", sender=None, **payload):
        body = json.dumps(payload).encode("utf-8")
        return self.broker.publish(event, payload, body, to=(to,), sender=sender)


class _Text(resource.Resource):
    isLeaf = True

    def __init__(self, text):
        super().__init__()
        self.text = text

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return self.text


class ApiTests(_WebCase):
    """
    The JSON API of an open broker, which shows everything.
    """

    def test_queues(self):
        """GET /api/queues gives the time, the totals and a row per queue."""
        self.clock.advance(100)
        self.publish("acme", orderId="1")
        self.publish("globex", event="pickup", orderId="2")
        response = self.get("/api/queues")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.header("cache-control"), "no-store")
        body = response.json()
        self.assertEqual(body["time"], 100.0)
        self.assertEqual(
            body["totals"],
            {
                "published": 2,
                "delivered": 0,
                "redelivered": 0,
                "acknowledged": 0,
                "deadLettered": 0,
            },
        )
        self.assertEqual(body["queues"], self.broker.queue_rows())
        self.assertEqual(
            [(q["clientId"], q["event"], q["depth"]) for q in body["queues"]],
            [("acme", "delivered", 1), ("globex", "pickup", 1)],
        )

    def test_messages_paged(self):
        """A queue's messages come oldest first, after a seq, at most limit, with how many more, payloads as JSON."""
        for n in range(5):
            self.publish("acme", orderId=str(n))
        body = self.get("/api/queues/acme/delivered/messages?limit=2").json()
        self.assertEqual(
            [m["payload"] for m in body["messages"]],
            [{"orderId": "0"}, {"orderId": "1"}],
        )
        self.assertEqual(body["more"], 3)
        after = body["messages"][-1]["seq"]
        body = self.get(f"/api/queues/acme/delivered/messages?after={after}").json()
        self.assertEqual(
            [m["payload"]["orderId"] for m in body["messages"]], ["2", "3", "4"]
        )
        self.assertEqual(body["more"], 0)
        self.assertEqual(
            set(body["messages"][0]),
            {"seq", "messageId", "time", "payload", "deliveries", "inFlight"},
        )
        self.assertEqual(len(self.broker.queue("acme", "delivered")), 5)

    def test_messages_of_no_queue(self):
        """Peeking a queue that does not exist is a 404 no-queue."""
        response = self.get("/api/queues/acme/delivered/messages")
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json()["error"], "no-queue")

    def test_bad_arguments(self):
        """A limit past 1000, a negative or non-numeric after, or non-UTF-8 are 400 bad-request."""
        self.publish("acme", orderId="1")
        for query in ("limit=1001", "after=-1", "after=x", "limit=", "after=1e3"):
            response = self.get(f"/api/queues/acme/delivered/messages?{query}")
            self.assertEqual((query, response.status), (query, 400))
            self.assertEqual(response.json()["error"], "bad-request")
        self.assertEqual(self.get("/api/queues/%ff/delivered/messages").status, 400)
        self.assertEqual(self.get("/api/events?clientId=%ff").status, 400)
        self.assertEqual(
            self.get("/api/queues/acme/delivered/messages?limit=1000").status, 200
        )

    def test_purge(self):
        """POST purge deletes the queue's messages that are not in flight and says how many."""
        connection = RecordingConnection()
        self.broker.connect(connection)
        self.broker.subscribe(connection, "acme", "delivered", prefetch=1)
        for n in range(3):
            self.publish("acme", orderId=str(n))
        response = self.post("/api/queues/acme/delivered/purge")
        self.assertEqual((response.status, response.json()), (200, {"purged": 2}))
        self.assertEqual(len(self.broker.queue("acme", "delivered")), 1)
        self.assertEqual(self.post("/api/queues/nobody/delivered/purge").status, 404)
        self.broker.disconnect(connection)

    def test_requeue(self):
        """POST requeue brings dead letters back, one by messageId or all."""
        for n in range(3):
            self.broker.publish(
                "delivered", {}, b"{}", to=("acme",), message_id=f"m{n}", ttl=1
            )
        self.clock.advance(60)
        self.assertEqual(len(self.broker.queue("acme", "delivered.dead")), 3)
        response = self.post("/api/queues/acme/delivered/requeue?messageId=m1")
        self.assertEqual(
            response.json(), {"clientId": "acme", "event": "delivered", "requeued": 1}
        )
        response = self.post("/api/queues/acme/delivered/requeue")
        self.assertEqual(response.json()["requeued"], 2)
        self.assertEqual(len(self.broker.queue("acme", "delivered")), 3)
        self.broker.stop()

    def test_clients(self):
        """GET /api/clients lists the connections with what they consume."""
        connection = RecordingConnection()
        connection.remote = "127.0.0.1:5000"
        self.broker.connect(connection)
        self.broker.subscribe(connection, "acme", "delivered")
        self.assertEqual(
            self.get("/api/clients").json(),
            {
                "clients": [
                    {
                        "address": "127.0.0.1:5000",
                        "clientId": None,
                        "subscriptions": [{"clientId": "acme", "event": "delivered"}],
                        "inFlight": 0,
                    }
                ]
            },
        )
        self.broker.disconnect(connection)

    def test_events(self):
        """GET /api/events gives the recent messages after a seq, all or one client's, and the last seq."""
        self.publish("acme", orderId="1", sender="ann")
        self.publish("globex", orderId="2")
        self.publish("driver", event="pickup", store="acme", orderId="3")
        body = self.get("/api/events").json()
        self.assertEqual([e["seq"] for e in body["events"]], [1, 2, 3])
        self.assertEqual(body["last"], 3)
        self.assertEqual(
            body["events"][0],
            {
                "seq": 1,
                "time": 0.0,
                "event": "delivered",
                "messageId": body["events"][0]["messageId"],
                "recipients": ["acme"],
                "sender": "ann",
                "payload": {"orderId": "1"},
            },
        )
        body = self.get("/api/events?clientId=acme&after=1").json()
        self.assertEqual([e["seq"] for e in body["events"]], [3])
        self.assertEqual(
            self.get("/api/events?after=3").json(),
            {"events": [], "last": 3, "missed": False},
        )

    def test_events_paged_and_missed(self):
        """GET /api/events answers at most limit events, and says when messages after `after` have left the bounded log."""
        self.broker.monitor = Monitor(size=3)
        for n in range(5):
            self.publish("acme", orderId=str(n))
        body = self.get("/api/events?limit=2").json()
        self.assertEqual(
            ([e["seq"] for e in body["events"]], body["last"]), ([3, 4], 4)
        )
        # Seqs 1 and 2 are gone from the log of 3.
        self.assertTrue(body["missed"])
        body = self.get("/api/events?after=2").json()
        self.assertEqual(
            ([e["seq"] for e in body["events"]], body["missed"]), ([3, 4, 5], False)
        )
        self.assertEqual(self.get("/api/events?limit=1001").status, 400)
        # tail: the newest few, for a page that shows only those.
        body = self.get("/api/events?tail=2").json()
        self.assertEqual(
            ([e["seq"] for e in body["events"]], body["last"]), ([4, 5], 5)
        )

    def test_wrong_method_and_path(self):
        """A wrong method is a 405 with Allow, an unknown path a 404, both JSON."""
        response = self.get("/api/queues/acme/delivered/purge")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header("allow"), "POST")
        self.assertEqual(response.json()["error"], "method-not-allowed")
        self.assertEqual(self.post("/api/queues").status, 405)
        for path in ("/api/nothing", "/api/queues/acme", "/nothing", "/store/"):
            response = self.get(path)
            self.assertEqual((path, response.status), (path, 404))
            self.assertEqual(response.json()["error"], "not-found")

    def test_internal_error(self):
        """An unexpected failure is logged and answered 500 internal-error, with no traceback."""
        self.patch(self.broker, "queue_rows", lambda visible=None: 1 / 0)
        response = self.get("/api/queues")
        self.assertEqual(response.status, 500)
        self.assertEqual(response.json()["error"], "internal-error")
        self.assertNotIn(b"Traceback", response.body)
        self.assertNotIn(b"ZeroDivision", response.body)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_store_unavailable(self):
        """A purge while the store cannot write is a 503 store-unavailable."""
        self.publish("acme", orderId="1")
        self.patch(self.broker.store, "available", False)
        response = self.post("/api/queues/acme/delivered/purge")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["error"], "store-unavailable")

    def test_script_payload_is_data(self):
        """A payload holding <script> comes back as JSON data only: no markup in the body."""
        note = "</script><script>alert(1)</script> & <b>"
        self.publish("acme", note=note)
        for path in ("/api/queues/acme/delivered/messages", "/api/events"):
            response = self.get(path)
            self.assertEqual(response.header("content-type"), "application/json")
            self.assertEqual(response.header("x-content-type-options"), "nosniff")
            for markup in (b"<", b">", b"&"):
                self.assertNotIn(markup, response.body)
            body = response.json()
            [row] = body.get("messages") or body["events"]
            self.assertEqual(row["payload"], {"note": note})

    def test_security_headers(self):
        """Every response, page, file, API answer or error, carries the CSP and nosniff headers."""
        for path in ("/", "/store/acme", "/static/app.js", "/api/queues", "/nothing"):
            response = self.get(path)
            self.assertEqual(
                response.header("content-security-policy"), "default-src 'self'"
            )
            self.assertEqual(response.header("x-content-type-options"), "nosniff")
            self.assertEqual(response.header("x-frame-options"), "DENY")

    def test_pages_and_files(self):
        """/ is the operator's page, /store/<id> the store page, /static/ the files, without listings."""
        response = self.get("/")
        self.assertEqual(
            (response.status, response.body), (200, PAGES["operator.html"])
        )
        self.assertEqual(response.header("content-type"), "text/html; charset=utf-8")
        for client_id in ("acme", "globex"):
            response = self.get(f"/store/{client_id}")
            self.assertEqual(response.body, PAGES["store.html"])
        response = self.get("/static/app.js")
        self.assertEqual(response.body, PAGES["app.js"])
        self.assertEqual(
            response.header("content-type"), "text/javascript; charset=utf-8"
        )
        for path in (
            "/static/",
            "/static/nothing.js",
            "/static/../x",
            "/static/%2e%2e",
        ):
            response = self.get(path)
            self.assertEqual((path, response.status), (path, 404))
            self.assertEqual(response.json()["error"], "not-found")
        self.assertEqual(self.get("/store/acme/more").status, 404)
        os.remove(os.path.join(self.static, "store.html"))
        self.assertEqual(self.get("/store/acme").status, 404)

    def test_metrics(self):
        """The metrics resource given to make_site is served at /metrics."""
        response = self.get("/metrics")
        self.assertEqual(response.body, b"caps_published_total 0\n")

    def test_cross_site_post_refused(self):
        """A POST a browser sends for another site's page is refused; from the broker's own page it goes."""
        self.publish("acme", orderId="1")
        path = "/api/queues/acme/delivered/purge"
        for header in (
            "Origin: http://evil.example",
            "Origin: http://127.0.0.1:9999",
            "Origin: null",
            "Sec-Fetch-Site: cross-site",
            "Sec-Fetch-Site: same-site",
        ):
            response = self.post(path, headers=[header])
            self.assertEqual((header, response.status), (header, 403))
            self.assertEqual(response.json()["error"], "forbidden")
        self.assertEqual(len(self.broker.queue("acme", "delivered")), 1)
        response = self.post(
            path,
            headers=["Origin: http://127.0.0.1:8080", "Sec-Fetch-Site: same-origin"],
        )
        self.assertEqual(response.json(), {"purged": 1})

    def test_open_broker_by_name_refused(self):
        """An open broker answers only requests naming it by IP address or localhost (DNS rebinding)."""
        response = self.get("/api/queues", host="rebind.example:8080")
        self.assertEqual(response.status, 403)
        self.assertIn("open", response.json()["message"])
        for host in ("localhost:8080", "[::1]:8080", "10.1.2.3", "app.localhost"):
            self.assertEqual(
                (host, self.get("/api/queues", host=host).status), (host, 200)
            )


class AuthTests(_WebCase):
    """
    With --auth: HTTP basic authentication, and what each client's
    permissions let it see.
    """

    def setUp(self):
        checker = InMemoryUsernamePasswordDatabaseDontUse(**PASSWORDS)
        self.portal = Portal(Realm(parse_acl(ACL)), [checker])
        super().setUp()
        self.publish("acme", orderId="1")
        self.publish("acme", event="in-transit", orderId="1")
        self.publish("globex", orderId="2")

    def test_credentials_needed(self):
        """Without credentials, or with wrong ones, every path is a 401 asking for basic auth in realm CAPS."""
        for path in ("/", "/store/acme", "/static/app.js", "/api/queues", "/metrics"):
            for user in (None, "mallory"):
                response = self.get(path, user=user)
                # A failed login is answered late (below).
                self.clock.advance(LOGIN_DELAY_MAX)
                self.assertEqual((path, response.status), (path, 401))
                self.assertEqual(
                    response.header("www-authenticate"), 'basic realm="CAPS"'
                )
                self.assertEqual(
                    response.header("content-security-policy"), "default-src 'self'"
                )
        wrong = base64.b64encode(b"acme:globex-pw").decode()
        response = self.get("/api/queues", headers=[f"Authorization: Basic {wrong}"])
        self.clock.advance(LOGIN_DELAY_MAX)
        self.assertEqual(response.status, 401)

    def test_failed_logins_slowed(self):
        """Wrong passwords are answered after 1, 2, 4, ... s from one address, and logged with it, as the broker's logins are."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        wrong = base64.b64encode(b"acme:guess").decode()
        waits = []
        for _ in range(4):
            response = self.get(
                "/api/queues", headers=[f"Authorization: Basic {wrong}"]
            )
            waited = 0.0
            while not response.transport.value():
                self.clock.advance(0.5)
                waited += 0.5
            self.assertEqual(response.status, 401)
            waits.append(waited)
        self.assertEqual(waits, [1, 2, 4, 8])
        failures = [e for e in events if "web login as" in e.get("log_format", "")]
        self.assertEqual(
            [(e["clientId"], e["address"]) for e in failures],
            [("acme", "127.0.0.1")] * 4,
        )
        # The right password is not slowed.
        self.assertEqual(self.get("/api/queues", user="acme").status, 200)

    def test_retailer_sees_its_store(self):
        """A retailer sees only its own queues, events and page, and the totals of its queues."""
        body = self.get("/api/queues", user="acme").json()
        self.assertEqual(
            [(q["clientId"], q["event"]) for q in body["queues"]],
            [("acme", "delivered"), ("acme", "in-transit")],
        )
        self.assertEqual(
            body["totals"],
            {
                "published": 2,
                "delivered": 0,
                "redelivered": None,
                "acknowledged": None,
                "deadLettered": None,
            },
        )
        body = self.get("/api/events?clientId=acme", user="acme").json()
        self.assertEqual([e["seq"] for e in body["events"]], [1, 2])
        messages = self.get("/api/queues/acme/delivered/messages", user="acme")
        self.assertEqual(len(messages.json()["messages"]), 1)
        self.assertEqual(self.get("/store/acme", user="acme").body, PAGES["store.html"])
        self.assertEqual(self.get("/static/app.js", user="acme").status, 200)
        self.assertEqual(
            self.post("/api/queues/acme/delivered/purge", user="acme").json(),
            {"purged": 1},
        )

    def test_retailer_forbidden_elsewhere(self):
        """A retailer gets 403 forbidden for another's queues, events, stream and page, and the operator views."""
        for method, path in (
            ("GET", "/api/queues/globex/delivered/messages"),
            ("POST", "/api/queues/globex/delivered/purge"),
            ("POST", "/api/queues/globex/delivered/requeue"),
            ("GET", "/api/queues/nobody/delivered/messages"),
            ("GET", "/api/events?clientId=globex"),
            ("GET", "/api/events"),
            ("GET", "/api/stream"),
            ("GET", "/api/stream?clientId=globex"),
            ("GET", "/store/globex"),
            ("GET", "/"),
            ("GET", "/metrics"),
        ):
            response = self.request(method, path, user="acme")
            self.assertEqual((path, response.status), (path, 403))
            self.assertEqual(response.json()["error"], "forbidden")
        self.assertEqual(len(self.broker.queue("globex", "delivered")), 1)

    def test_clients_filtered(self):
        """A retailer sees only its own connections and subscriptions; the operator sees every one."""
        mine, theirs = RecordingConnection("mine"), RecordingConnection("theirs")
        for connection, client_id in ((mine, "acme"), (theirs, "globex")):
            connection.remote = f"address of {client_id}"
            connection.identity = self.portal.realm.acl.permissions(client_id)
            self.broker.connect(connection)
            self.broker.subscribe(connection, client_id, "delivered")
        # The operator's own dashboard, watching both stores.
        watcher = RecordingConnection("ops")
        watcher.remote = "address of ops"
        watcher.identity = self.portal.realm.acl.permissions("ops")
        self.broker.connect(watcher)
        self.broker.subscribe(watcher, "acme", "in-transit")
        self.broker.subscribe(watcher, "globex", "in-transit")
        unnamed = RecordingConnection("not logged in yet")
        self.broker.connect(unnamed)
        rows = self.get("/api/clients", user="acme").json()["clients"]
        self.assertEqual(
            [(r["clientId"], r["address"], r["subscriptions"]) for r in rows],
            [
                (
                    "acme",
                    "address of acme",
                    [{"clientId": "acme", "event": "delivered"}],
                ),
                (None, None, [{"clientId": "acme", "event": "in-transit"}]),
            ],
        )
        rows = self.get("/api/clients", user="ops").json()["clients"]
        self.assertEqual(len(rows), 4)
        for connection in (mine, theirs, watcher, unnamed):
            self.broker.disconnect(connection)

    def test_operator_sees_everything(self):
        """The operator (observe = ["*"]) sees every queue, client, event, page and the metrics."""
        body = self.get("/api/queues", user="ops").json()
        self.assertEqual(len(body["queues"]), 3)
        self.assertEqual(body["totals"]["published"], 3)
        self.assertEqual(len(self.get("/api/events", user="ops").json()["events"]), 3)
        for path in ("/", "/store/globex", "/metrics", "/api/clients"):
            self.assertEqual((path, self.get(path, user="ops").status), (path, 200))
        response = self.get("/api/queues/globex/delivered/messages", user="ops")
        self.assertEqual(len(response.json()["messages"]), 1)

    def test_named_host_allowed(self):
        """With --auth, a DNS name in the URL is fine (no rebinding: the browser keeps the password per site)."""
        response = self.get("/api/queues", user="acme", host="broker.example:8080")
        self.assertEqual(response.status, 200)


class StreamTests(_WebCase):
    """
    GET /api/stream: server-sent events.
    """

    def stream(self, query="", **kwargs):
        response = self.get(f"/api/stream{query}", **kwargs)
        self.assertEqual(response.status, 200)
        self.assertEqual(
            response.header("content-type"), "text/event-stream; charset=utf-8"
        )
        return response

    def test_replay_then_live(self):
        """A stream sends retry, the recent messages involving the client, then new ones as they are published."""
        self.publish("acme", orderId="1")
        self.publish("globex", orderId="2")
        self.publish("driver", event="pickup", store="acme", orderId="3")
        response = self.stream("?clientId=acme")
        self.assertEqual(response.events()[0], {"retry": "1000"})
        self.assertEqual([seq for seq, _ in response.messages()], [1, 3])
        self.publish("acme", orderId="4")
        self.publish("globex", orderId="5")
        messages = response.messages()
        self.assertEqual([seq for seq, _ in messages], [1, 3, 4])
        self.assertEqual(messages[-1][1]["payload"], {"orderId": "4"})
        self.assertEqual(messages[-1][1]["recipients"], ["acme"])

    def test_reconnect_without_gaps_or_duplicates(self):
        """A page reconnecting with Last-Event-ID (which wins over after) gets exactly what it missed, then live."""
        for n in range(3):
            self.publish("acme", orderId=str(n))
        first = self.stream("?clientId=acme")
        seen = [seq for seq, _ in first.messages()]
        first.close()
        for n in range(3, 6):
            self.publish("acme", orderId=str(n))
        second = self.stream(
            "?clientId=acme&after=1", headers=[f"Last-Event-ID: {seen[-1]}"]
        )
        self.publish("acme", orderId="6")
        seen += [seq for seq, _ in second.messages()]
        self.assertEqual(seen, list(range(1, 8)))
        third = self.stream("?clientId=acme&after=5")
        self.assertEqual([seq for seq, _ in third.messages()], [6, 7])

    def test_disconnect_removes_listener(self):
        """When the connection drops, the listener and the timers go; later messages are not written."""
        response = self.stream("?clientId=acme")
        self.assertEqual(list(self.broker.monitor.watchers), ["acme"])
        operator = self.stream()
        self.assertEqual(len(self.broker.monitor.listeners), 1)
        operator.close()
        response.close()
        self.assertEqual(self.broker.monitor.listeners, set())
        self.assertEqual(self.broker.monitor.watchers, {})
        self.assertEqual(self.site.streams.open, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        written = response.transport.value()
        self.publish("acme", orderId="1")
        self.assertEqual(response.transport.value(), written)

    def test_snapshots_and_keepalive(self):
        """The queues snapshot comes at once and every second by the broker's clock; a keepalive every 15 s."""
        self.publish("acme", orderId="1")
        self.publish("globex", orderId="2")
        response = self.stream("?clientId=acme")
        snapshots = [e for e in response.events() if e.get("event") == "queues"]
        self.assertEqual(len(snapshots), 1)
        body = json.loads(snapshots[0]["data"])
        self.assertEqual([q["clientId"] for q in body["queues"]], ["acme"])
        self.publish("acme", orderId="3")
        self.clock.advance(1)
        snapshots = [e for e in response.events() if e.get("event") == "queues"]
        self.assertEqual(len(snapshots), 2)
        self.assertEqual(json.loads(snapshots[1]["data"])["queues"][0]["depth"], 2)
        self.assertNotIn(b": keepalive", response.body)
        self.clock.pump([1] * 14)
        self.assertEqual(response.body.count(b"\n: keepalive\n\n"), 1)
        self.assertEqual(
            len([e for e in response.events() if e.get("event") == "queues"]), 16
        )

    def test_operator_stream(self):
        """Without clientId the stream carries every message, with every queue in its snapshots."""
        self.publish("acme", orderId="1")
        response = self.stream()
        self.publish("globex", orderId="2")
        self.assertEqual([seq for seq, _ in response.messages()], [1, 2])

    def test_slow_reader(self):
        """A reader whose send buffer is full is sent nothing until it drains, then what it missed, in order."""
        response = self.stream("?clientId=acme")
        # The transport says its buffer is full, then empty.
        response.channel._channel.pauseProducing()
        self.publish("acme", orderId="1")
        self.clock.advance(1)
        self.assertEqual(response.messages(), [])
        self.assertEqual(
            len([e for e in response.events() if e.get("event") == "queues"]), 1
        )
        self.publish("acme", orderId="2")
        response.channel._channel.resumeProducing()
        self.publish("acme", orderId="3")
        self.assertEqual([seq for seq, _ in response.messages()], [1, 2, 3])

    def test_listener_failure_stays_out_of_publish(self):
        """A stream that fails while writing is logged and cut; the publish goes on."""
        response = self.stream()
        self.patch(response.transport, "writeSequence", lambda data: 1 / 0)
        self.patch(response.transport, "write", lambda data: 1 / 0)
        self.assertEqual(self.publish("acme", orderId="1")["queues"], 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.broker.monitor.listeners, set())
        self.assertTrue(response.transport.disconnecting)

    def test_slow_reader_past_the_log(self):
        """A reader paused while more was published than the recent log keeps is told to start over (reset), then sent what the log still has."""
        self.broker.monitor = Monitor(size=5)
        response = self.stream("?clientId=acme")
        response.channel._channel.pauseProducing()
        for n in range(10):
            self.publish("acme", orderId=str(n))
        response.channel._channel.resumeProducing()
        kinds = [e.get("event") for e in response.events() if "event" in e]
        self.assertEqual(
            [k for k in kinds if k != "queues"], ["reset"] + ["message"] * 5
        )
        self.assertEqual([seq for seq, _ in response.messages()], [6, 7, 8, 9, 10])

    def test_slow_reader_within_the_log(self):
        """A reader paused for less than the log holds gets no reset, even if the messages were not its own."""
        self.broker.monitor = Monitor(size=5)
        response = self.stream("?clientId=acme")
        response.channel._channel.pauseProducing()
        for n in range(4):
            self.publish("globex", orderId=str(n))
        self.publish("acme", orderId="4")
        response.channel._channel.resumeProducing()
        self.assertNotIn(b"event: reset", response.body)
        self.assertEqual([seq for seq, _ in response.messages()], [5])

    def test_head_opens_no_stream(self):
        """HEAD /api/stream is refused (405) instead of holding a stream open."""
        response = self.request("HEAD", "/api/stream")
        self.assertEqual(response.status, 405)
        self.assertEqual(self.site.streams.open, set())

    def test_bad_last_event_id(self):
        """A Last-Event-ID that is not a number is a 400."""
        response = self.get("/api/stream", headers=["Last-Event-ID: x"])
        self.assertEqual(response.status, 400)
        self.assertEqual(self.broker.monitor.listeners, set())


class AuthStreamTests(_WebCase):
    """
    The stream with --auth.
    """

    def setUp(self):
        checker = InMemoryUsernamePasswordDatabaseDontUse(**PASSWORDS)
        self.portal = Portal(Realm(parse_acl(ACL)), [checker])
        super().setUp()

    def test_client_gone_during_login(self):
        """A client that leaves while its password is checked leaves no stream, listener or logged error behind."""
        checks = []

        @implementer(ICredentialsChecker)
        class Slow:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                checks.append(Deferred())
                return checks[-1].addCallback(lambda _: credentials.username)

        self.site = make_site(
            self.broker,
            portal=Portal(Realm(parse_acl(ACL)), [Slow()]),
            static_dir=self.static,
        )
        for user, path in (
            ("acme", "/api/stream?clientId=acme"),
            ("acme", "/api/queues"),
        ):
            response = self.get(path, user=user)
            response.close()
            checks[-1].callback(None)
            self.assertEqual(self.site.streams.open, set())
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_late_401_to_a_client_gone(self):
        """A failed login answered after its delay to a client that already left logs no error."""
        response = self.get("/api/queues", user="acme", password=b"wrong")
        response.close()
        self.clock.advance(LOGIN_DELAY_MAX)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_retailer_stream(self):
        """A retailer's stream carries its messages only, and snapshots of its queues only."""
        self.publish("acme", orderId="1")
        self.publish("globex", orderId="2")
        response = self.get("/api/stream?clientId=acme", user="acme")
        self.publish("globex", orderId="3")
        self.broker.publish("delivered", {}, b"{}", to=("acme",), sender="globex")
        self.assertEqual([seq for seq, _ in response.messages()], [1, 4])
        [snapshot] = [e for e in response.events() if e.get("event") == "queues"]
        self.assertEqual(
            {q["clientId"] for q in json.loads(snapshot["data"])["queues"]}, {"acme"}
        )


class TapTests(SynchronousTestCase):
    """
    The --web option of twistd caps-broker.
    """

    def make(self, reactor, *argv):
        options = tap.Options()
        options.parseOptions(["--store", "memory", *argv])
        return tap.makeService(options, reactor=reactor)

    def test_web_listens(self):
        """--web (repeatable) serves the web site on each endpoint, open without --auth, guarded with it."""
        reactor = MemoryReactor()
        service = self.make(
            reactor,
            "--web",
            "tcp:8080:interface=127.0.0.1",
            "--web",
            "tcp:8081:interface=127.0.0.1",
        )
        service.startService()
        [broker_port, first, second] = reactor.tcpServers
        self.assertEqual((first[0], second[0]), (8080, 8081))
        self.assertIsInstance(first[1], WebSite)
        self.assertIs(first[1], second[1])
        self.assertTrue(first[1].open)
        self.successResultOf(service.stopService())
        reactor = MemoryReactor()
        service = self.make(
            reactor, "--auth", "memory:acme:pw", "--web", "tcp:8080:interface=127.0.0.1"
        )
        service.startService()
        site = reactor.tcpServers[1][1]
        self.assertIsInstance(site.resource, HTTPAuthSessionWrapper)
        self.assertFalse(site.open)
        self.successResultOf(service.stopService())

    def test_no_web_by_default(self):
        """Without --web nothing serves HTTP."""
        reactor = MemoryReactor()
        service = self.make(reactor)
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.successResultOf(service.stopService())

    def test_bad_web(self):
        """A --web that is no endpoint description is a usage error naming --web."""
        e = self.assertRaises(
            usage.UsageError, tap.Options().parseOptions, ["--web", "nonsense:1"]
        )
        self.assertIn("--web", str(e))

    def test_open_warning_names_exposed_web(self):
        """An open broker's warning names a --web endpoint that is not loopback only."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.make(MemoryReactor(), "--web", "tcp:8080")
        [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("NOT loopback only: tcp:8080", warning)
        del events[:]
        self.make(MemoryReactor(), "--web", "tcp:8080:interface=127.0.0.1")
        [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertNotIn("NOT loopback", warning)
        self.assertIn("tcp:8080:interface=127.0.0.1", warning)


class TwistdWebTests(SynchronousTestCase):
    """
    twistd -n caps-broker --web as a process, over loopback HTTP.
    """

    def test_real_broker(self):
        """A real broker with --auth and --web answers 401, then the API, then a message on its stream."""
        scratch = tempfile.TemporaryDirectory(prefix="caps-web-")
        self.addCleanup(scratch.cleanup)
        passwords = os.path.join(scratch.name, "passwords.txt")
        with open(passwords, "w") as f:
            f.write(f"acme:{hash_password('acme-pw', n=16)}\n")
        broker = RunningBroker(
            "memory",
            "--auth",
            f"file:{passwords}",
            "--web",
            "tcp:0:interface=127.0.0.1",
        )
        self.addCleanup(broker.stop)
        host, port = broker.wait_for(WEB_LISTENING).group(1).rsplit(":", 1)

        def get(path, password=None, timeout=10):
            connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
            self.addCleanup(connection.close)
            headers = {}
            if password is not None:
                secret = base64.b64encode(b"acme:" + password).decode()
                headers["Authorization"] = f"Basic {secret}"
            connection.request("GET", path, headers=headers)
            return connection.getresponse()

        self.assertEqual(get("/api/queues").status, 401)
        self.assertEqual(get("/api/queues", b"wrong").status, 401)
        response = get("/api/queues", b"acme-pw")
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read())["queues"], [])
        stream = get("/api/stream?clientId=acme", b"acme-pw")
        self.assertEqual(
            stream.getheader("content-type"), "text/event-stream; charset=utf-8"
        )
        sock, reader = broker.connect()
        self.addCleanup(sock.close)
        send(
            sock,
            {
                "event": "login",
                "id": 1,
                "payload": {"clientId": "acme", "password": "acme-pw"},
            },
        )
        self.assertEqual(read(reader)["event"], "ok")
        send(
            sock,
            {"event": "delivered", "to": "acme", "id": 2, "payload": {"orderId": "o1"}},
        )
        self.assertEqual(read(reader)["event"], "ok")
        lines = []
        while "event: message" not in lines:
            lines.append(stream.readline().decode("utf-8").rstrip("\n"))
        data = json.loads(stream.readline().decode("utf-8").removeprefix("data: "))
        self.assertEqual(data["payload"], {"orderId": "o1"})
        self.assertEqual(broker.stop(), -signal.SIGTERM)
        self.assertNotIn("Traceback", broker.text())
        self.assertNotIn("acme-pw", broker.text())
