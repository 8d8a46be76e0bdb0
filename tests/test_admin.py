"""
C{python -m caps.admin} against a stand-in for the broker's JSON API (a
standard-library HTTP server on loopback, in a thread, answering canned
JSON and recording each request), and once against a real broker.
"""

import base64
import io
import json
import os
import re
import socket
import tempfile
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import SkipTest

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from caps import admin

from .processes import RunningBroker, read, send

QUEUES = {
    "time": 1700000100.0,
    "totals": {
        "published": 12,
        "delivered": 9,
        "redelivered": 1,
        "acknowledged": 8,
        "deadLettered": 1,
    },
    "queues": [
        {
            "clientId": "acme-widgets",
            "event": "delivered",
            "depth": 3,
            "inFlight": 1,
            "deadLetters": 0,
            "consumers": 1,
            "subscribed": True,
            "oldestAge": 12.5,
            "published": 11,
            "delivered": 8,
        },
        {
            "clientId": "driver",
            "event": "pickup.dead",
            "depth": 1,
            "inFlight": 0,
            "deadLetters": 0,
            "consumers": 0,
            "subscribed": False,
            "oldestAge": None,
            "published": 1,
            "delivered": 1,
        },
    ],
}
MESSAGES = {
    "messages": [
        {
            "seq": 7,
            "messageId": "b2853cb4cc84-7",
            "time": 1700000000.25,
            "payload": {"orderId": "1001", "note": "x" * 80},
            "deliveries": 2,
            "inFlight": True,
        },
        {
            "seq": 12,
            "messageId": "b2853cb4cc84-12",
            "time": 1700000050.0,
            "payload": {"orderId": "1002"},
            "deliveries": 0,
            "inFlight": False,
        },
    ],
    "more": 4,
}
CLIENTS = {
    "clients": [
        {
            "address": "127.0.0.1",
            "clientId": "acme-widgets",
            "subscriptions": [
                {"clientId": "acme-widgets", "event": "delivered"},
                {"clientId": "acme-widgets", "event": "in-transit"},
            ],
            "inFlight": 1,
        },
        {"address": "10.0.0.7", "clientId": None, "subscriptions": [], "inFlight": 0},
    ]
}


class StandIn:
    """
    The JSON API's stand-in: C{answers} maps (method, path without the
    query) to (status, body); C{requests} records (method, raw path,
    headers, body) of each request.
    """

    def __init__(self):
        self.answers = {}
        self.requests = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                stand_in.requests.append(
                    (self.command, self.path, dict(self.headers), body)
                )
                key = (self.command, self.path.split("?")[0])
                status, reply = stand_in.answers.get(
                    key,
                    (404, {"error": "not-found", "message": "no such page"}),
                )
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), daemon=True
        )
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class AdminTests(SynchronousTestCase):
    def setUp(self):
        self.api = StandIn()
        self.addCleanup(self.api.stop)
        self.api.answers.update(
            {
                ("GET", "/api/queues"): (200, QUEUES),
                ("GET", "/api/clients"): (200, CLIENTS),
                ("GET", "/api/queues/acme-widgets/delivered/messages"): (
                    200,
                    MESSAGES,
                ),
            }
        )
        environ = dict(os.environ)
        environ.pop("CAPS_PASSWORD", None)
        environ.pop("CAPS_URL", None)
        self.patch(os, "environ", environ)

    def run_admin(self, *argv, url=None):
        """
        Run the command; return (exit code, stdout, stderr).
        """
        out, err = io.StringIO(), io.StringIO()
        code = admin.main(["--url", url or self.api.url, *argv], out, err)
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def password_file(self, text):
        handle = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        self.addCleanup(os.unlink, handle.name)
        with handle:
            handle.write(text)
        return handle.name

    def test_queues_table(self):
        """queues prints an aligned table with the API's field names as columns, numbers aligned right, and the totals."""
        code, out, err = self.run_admin("queues")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), list(admin.QUEUE_COLUMNS))
        self.assertEqual(
            lines[1].split(),
            ["acme-widgets", "delivered", "3", "1", "0", "1", "yes", "12.5", "11", "8"],
        )
        self.assertEqual(
            lines[2].split(),
            ["driver", "pickup.dead", "1", "0", "0", "0", "no", "-", "1", "1"],
        )
        # Aligned: every column starts at the same offset on each line.
        for column in ("event", "subscribed"):
            offset = lines[0].index(column)
            self.assertEqual(lines[1][offset - 1], " ")
            self.assertNotEqual(lines[1][offset], " ")
        # A number column ends where its header ends.
        end = lines[0].index("published") + len("published")
        self.assertEqual(lines[1][end - 2 : end], "11")
        self.assertIn("totals: published 12  delivered 9", out)
        self.assertEqual(self.api.requests[0][:2], ("GET", "/api/queues"))

    def test_queues_totals_hidden(self):
        """Totals the broker does not show to this login (null) are shown as '-'."""
        answer = dict(QUEUES, totals={"published": 2, "redelivered": None})
        self.api.answers["GET", "/api/queues"] = (200, answer)
        code, out, err = self.run_admin("queues")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[-1], "totals: published 2  redelivered -")

    def test_queues_json(self):
        """--json prints the API's JSON exactly as it came, for scripts."""
        code, out, err = self.run_admin("--json", "queues")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, json.dumps(QUEUES) + "\n")

    def test_peek(self):
        """peek asks for one queue's messages with after and limit, and shows them with UTC times, short payloads and how to page on."""
        code, out, err = self.run_admin(
            "peek", "acme-widgets", "delivered", "--after", "5", "--limit", "2"
        )
        self.assertEqual((code, err), (0, ""))
        method, path, headers, body = self.api.requests[0]
        self.assertEqual(
            (method, path),
            ("GET", "/api/queues/acme-widgets/delivered/messages?after=5&limit=2"),
        )
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), list(admin.MESSAGE_COLUMNS))
        self.assertEqual(
            lines[1].split()[:5],
            ["7", "b2853cb4cc84-7", "2023-11-14T22:13:20Z", "2", "yes"],
        )
        self.assertTrue(lines[1].endswith("..."), lines[1])
        self.assertLessEqual(len(lines[1].split(None, 5)[5]), admin.PAYLOAD_WIDTH)
        self.assertEqual(lines[2].split()[5], '{"orderId":"1002"}')
        self.assertEqual(lines[-1], "4 more: --after 12")

    def test_peek_defaults(self):
        """peek without --after or --limit leaves them to the broker."""
        code, out, err = self.run_admin("peek", "acme-widgets", "delivered")
        self.assertEqual(code, 0)
        self.assertEqual(
            self.api.requests[0][1], "/api/queues/acme-widgets/delivered/messages"
        )

    def test_quoted(self):
        """ClientIds and events are URL-quoted as one path segment each."""
        self.api.answers["GET", "/api/queues/a%20b%2Fc%3F/d%C3%A9l%23/messages"] = (
            200,
            {"messages": [], "more": 0},
        )
        code, out, err = self.run_admin("peek", "a b/c?", "dél#")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), ["  ".join(admin.MESSAGE_COLUMNS)])

    def test_peek_no_queue(self):
        """A 404 no-queue answer is one line on stderr with the API's code and message, and exit code 1."""
        self.api.answers["GET", "/api/queues/acme/nope/messages"] = (
            404,
            {"error": "no-queue", "message": "there is no queue (acme, nope)"},
        )
        code, out, err = self.run_admin("peek", "acme", "nope")
        self.assertEqual(
            (code, out, err),
            (1, "", "caps.admin: 404 no-queue: there is no queue (acme, nope)\n"),
        )

    def test_purge(self):
        """purge POSTs to the queue's purge and shows how many messages went."""
        self.api.answers["POST", "/api/queues/acme-widgets/delivered/purge"] = (
            200,
            {"purged": 3},
        )
        code, out, err = self.run_admin("purge", "acme-widgets", "delivered")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.api.requests[0][0], "POST")
        self.assertEqual(
            out.splitlines(),
            [
                "clientId      event      purged",
                "acme-widgets  delivered       3",
            ],
        )

    def test_requeue(self):
        """requeue POSTs to the queue's requeue, with messageId when given, and shows how many came back."""
        answer = {"clientId": "acme-widgets", "event": "delivered", "requeued": 1}
        self.api.answers["POST", "/api/queues/acme-widgets/delivered/requeue"] = (
            200,
            answer,
        )
        code, out, err = self.run_admin(
            "requeue", "acme-widgets", "delivered", "--message-id", "b28-1 &x"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            self.api.requests[0][:2],
            ("POST", "/api/queues/acme-widgets/delivered/requeue?messageId=b28-1+%26x"),
        )
        self.assertEqual(
            out.splitlines()[1].split(), ["acme-widgets", "delivered", "1"]
        )
        code, out, err = self.run_admin(
            "--json", "requeue", "acme-widgets", "delivered"
        )
        self.assertEqual(
            self.api.requests[1][1], "/api/queues/acme-widgets/delivered/requeue"
        )
        self.assertEqual(json.loads(out), answer)

    def test_clients(self):
        """clients shows each connection's address, clientId, in flight and subscriptions."""
        code, out, err = self.run_admin("clients")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "address    clientId      inFlight  subscriptions",
                "127.0.0.1  acme-widgets         1  "
                "acme-widgets/delivered, acme-widgets/in-transit",
                "10.0.0.7   -                    0  -",
            ],
        )

    def test_control_characters(self):
        """Control characters in user data (a clientId with a newline or an escape) are printed escaped, one line per row."""
        self.api.answers["GET", "/api/clients"] = (
            200,
            {
                "clients": [
                    {
                        "address": "::1",
                        "clientId": "evil\n\x1b[2J",
                        "subscriptions": [],
                        "inFlight": 0,
                    }
                ]
            },
        )
        code, out, err = self.run_admin("clients")
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 2)
        self.assertIn("evil\\n\\x1b[2J", out)
        self.assertNotIn("\x1b", out)

    def test_auth_header(self):
        """--user with --password-file sends HTTP basic auth with the file's first line as the password."""
        path = self.password_file("s3cret pass\nignored\n")
        code, out, err = self.run_admin(
            "--user", "acme-widgets", "--password-file", path, "queues"
        )
        self.assertEqual(code, 0)
        headers = self.api.requests[0][2]
        self.assertEqual(
            headers["Authorization"],
            "Basic " + base64.b64encode(b"acme-widgets:s3cret pass").decode(),
        )

    def test_password_from_environment(self):
        """Without --password-file the password comes from $CAPS_PASSWORD."""
        os.environ["CAPS_PASSWORD"] = "from-env"
        code, out, err = self.run_admin("--user", "ops", "clients")
        self.assertEqual(code, 0)
        self.assertEqual(
            self.api.requests[0][2]["Authorization"],
            "Basic " + base64.b64encode(b"ops:from-env").decode(),
        )

    def test_no_auth_header(self):
        """Without --user no Authorization header is sent, even with $CAPS_PASSWORD set."""
        os.environ["CAPS_PASSWORD"] = "unused"
        self.assertEqual(self.run_admin("queues")[0], 0)
        self.assertNotIn("Authorization", self.api.requests[0][2])

    def test_unauthorized(self):
        """A 401 says a login is needed, or that the one given was refused; exit code 1."""
        self.api.answers["GET", "/api/queues"] = (401, b"Unauthorized")
        code, out, err = self.run_admin("queues")
        self.assertEqual(code, 1)
        self.assertEqual(
            err,
            "caps.admin: 401 unauthorized: the broker needs a login: --user "
            "CLIENTID with --password-file FILE or $CAPS_PASSWORD\n",
        )
        path = self.password_file("wrong\n")
        code, out, err = self.run_admin(
            "--user", "acme", "--password-file", path, "queues"
        )
        self.assertEqual(
            (code, err),
            (1, "caps.admin: 401 unauthorized: wrong clientId or password\n"),
        )

    def test_forbidden(self):
        """A 403 shows the API's code and message; exit code 1."""
        self.api.answers["POST", "/api/queues/other/delivered/purge"] = (
            403,
            {"error": "forbidden", "message": "acme may not purge (other, delivered)"},
        )
        code, out, err = self.run_admin("purge", "other", "delivered")
        self.assertEqual(
            (code, err),
            (1, "caps.admin: 403 forbidden: acme may not purge (other, delivered)\n"),
        )

    def test_server_error_not_json(self):
        """An error answer that is not JSON still gives one line with the HTTP status."""
        self.api.answers["GET", "/api/queues"] = (500, b"<html>oops</html>")
        code, out, err = self.run_admin("queues")
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("caps.admin: 500 error: "), err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_not_json(self):
        """A 200 answer that is not JSON (not a CAPS broker) is an error, exit code 1."""
        self.api.answers["GET", "/api/queues"] = (200, b"<html>hello</html>")
        code, out, err = self.run_admin("queues")
        self.assertEqual(code, 1)
        self.assertIn("did not answer JSON", err)

    def test_wrong_shape(self):
        """A JSON answer of another shape is reported, not a traceback, and --json still prints it."""
        self.api.answers["GET", "/api/queues"] = (200, {"queues": [1, 2]})
        code, out, err = self.run_admin("queues")
        self.assertEqual(code, 1)
        self.assertIn("try --json", err)
        self.assertEqual(
            self.run_admin("--json", "queues")[:2], (0, '{"queues": [1, 2]}\n')
        )

    def test_connection_refused(self):
        """A broker that is not listening gives 'connection refused' on one line and exit code 1."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code, out, err = self.run_admin("queues", url=f"http://127.0.0.1:{port}")
        self.assertEqual(code, 1)
        self.assertEqual(
            err,
            f"caps.admin: cannot reach http://127.0.0.1:{port}: connection refused "
            "(is the broker running with --web?)\n",
        )

    def test_url_with_path(self):
        """A --url with a path (a reverse proxy's prefix) and a trailing slash is prefixed to /api."""
        self.api.answers["GET", "/caps/api/queues"] = (200, QUEUES)
        code, out, err = self.run_admin("queues", url=self.api.url + "/caps/")
        self.assertEqual(code, 0)
        self.assertEqual(self.api.requests[0][1], "/caps/api/queues")

    def test_usage_errors(self):
        """Usage errors (no command, bad numbers, a password on the command line, half a login, a bad URL) exit with 2 and send nothing."""
        path = self.password_file("pw\n")
        for argv in [
            [],
            ["frobnicate"],
            ["peek", "acme"],
            ["peek", "acme", "delivered", "--limit", "0"],
            ["peek", "acme", "delivered", "--after", "x"],
            ["--password", "pw", "queues"],
            ["--user", "acme", "queues"],
            ["--password-file", path, "queues"],
            ["--user", "acme", "--password-file", path + ".missing", "queues"],
            ["--url", "ftp://example/", "queues"],
        ]:
            out, err = io.StringIO(), io.StringIO()
            url = [] if argv[:1] == ["--url"] else ["--url", self.api.url]
            code = admin.main(url + argv, out, err)
            self.assertEqual(code, 2, argv)
            self.assertTrue(err.getvalue().startswith("usage: "), err.getvalue())
            self.assertNotIn("Traceback", err.getvalue())
        self.assertEqual(self.api.requests, [])

    def test_password_not_an_option(self):
        """--password is refused with a pointer to --password-file, not taken as an abbreviation of it, and not echoed."""
        code, out, err = self.run_admin("--password", "secret", "queues")
        self.assertEqual(code, 2)
        self.assertIn("no --password: give it in --password-file FILE", err)
        self.assertNotIn("secret", err)
        self.assertEqual(self.api.requests, [])

    def test_client_for_scripts(self):
        """Admin returns the parsed answer and its text, and raises AdminError with the status and code."""
        client = admin.Admin(self.api.url)
        answer, text = client.clients()
        self.assertEqual(answer, CLIENTS)
        error = self.assertRaises(admin.AdminError, client.peek, "x", "y")
        self.assertEqual((error.status, error.code), (404, "not-found"))


WEB_LISTENING = re.compile(r"CAPS web listening on (\S+)")


def web_broker(test, store, *args):
    """
    A real broker with C{--web} on a free loopback port, stopped at the end
    of C{test}; returns it and its web URL.
    """
    from caps.tap import Options

    if not hasattr(Options, "opt_web"):
        raise SkipTest("caps-broker has no --web option yet")
    broker = RunningBroker(store, "--web", "tcp:0:interface=127.0.0.1", *args)
    test.addCleanup(broker.stop)
    return broker, "http://" + broker.wait_for(WEB_LISTENING).group(1)


def until(reader, event):
    """
    Read frames until one of C{event}; return it.
    """
    while True:
        frame = read(reader)
        if frame["event"] == event:
            return frame


class RealBrokerTests(SynchronousTestCase):
    def setUp(self):
        environ = dict(os.environ)
        environ.pop("CAPS_PASSWORD", None)
        self.patch(os, "environ", environ)

    def test_every_command(self):
        """Every command works against twistd caps-broker --store memory --web, and /metrics agrees with what was done."""
        broker, url = web_broker(self, "memory", "--max-deliveries", "1")
        driver, driver_in = broker.connect()
        vendor, vendor_in = broker.connect()
        self.addCleanup(driver.close)
        self.addCleanup(vendor.close)
        send(
            driver,
            {
                "event": "subscribe",
                "id": 1,
                "payload": {"clientId": "driver", "event": "pickup"},
            },
        )
        until(driver_in, "ok")
        for n, (event, to) in enumerate(
            [("pickup", "driver"), ("pickup", "driver"), ("delivered", "acme")]
        ):
            send(
                vendor,
                {"event": event, "to": to, "id": n, "payload": {"orderId": str(n)}},
            )
            until(vendor_in, "ok")
        first, second = until(driver_in, "pickup"), until(driver_in, "pickup")
        for n, (kind, message) in enumerate([("received", first), ("nack", second)]):
            payload = {"clientId": "driver", "event": "pickup"}
            payload["messageId"] = message["messageId"]
            send(driver, {"event": kind, "id": 10 + n, "payload": payload})
            until(driver_in, "ok")

        def run(*argv):
            out, err = io.StringIO(), io.StringIO()
            code = admin.main(["--url", url, *argv], out, err)
            self.assertEqual((code, err.getvalue()), (0, ""), argv)
            return out.getvalue()

        queues = json.loads(run("--json", "queues"))
        rows = {(q["clientId"], q["event"]): q for q in queues["queues"]}
        self.assertEqual(rows["acme", "delivered"]["depth"], 1)
        self.assertEqual(rows["driver", "pickup"]["deadLetters"], 1)
        self.assertEqual(rows["driver", "pickup.dead"]["depth"], 1)
        table = run("queues").splitlines()
        self.assertEqual(table[0].split(), list(admin.QUEUE_COLUMNS))
        self.assertEqual(table[1].split()[:3], ["acme", "delivered", "1"])
        peeked = run("peek", "acme", "delivered").splitlines()
        self.assertEqual(len(peeked), 2)
        self.assertTrue(peeked[1].endswith('{"orderId":"2"}'), peeked[1])
        clients = json.loads(run("--json", "clients"))["clients"]
        self.assertEqual(len(clients), 2)
        self.assertIn(
            [{"clientId": "driver", "event": "pickup"}],
            [c["subscriptions"] for c in clients],
        )
        self.assertEqual(run("clients").count("driver/pickup"), 1)
        self.assertEqual(
            run("requeue", "driver", "pickup").splitlines()[1].split(),
            ["driver", "pickup", "1"],
        )
        self.assertEqual(until(driver_in, "pickup")["messageId"], second["messageId"])
        self.assertEqual(
            json.loads(run("--json", "purge", "acme", "delivered")), {"purged": 1}
        )
        out, err = io.StringIO(), io.StringIO()
        code = admin.main(["--url", url, "peek", "nobody", "nothing"], out, err)
        self.assertEqual(code, 1)
        self.assertTrue(err.getvalue().startswith("caps.admin: 404 no-queue: "))

        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            text = response.read().decode("utf-8")
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def total(name):
            (sample,) = [s for s in families[name].samples if s.name == name + "_total"]
            return sample.value

        self.assertEqual(total("caps_messages_published"), 3)
        self.assertEqual(total("caps_messages_acknowledged"), 1)
        self.assertEqual(total("caps_messages_dead_lettered"), 1)
        self.assertEqual(total("caps_messages_delivered"), 3)
        self.assertEqual(families["caps_connections"].samples[0].value, 2)
        self.assertNotIn("caps_store_commit_seconds", families)

    def test_login(self):
        """Against a real broker with --auth and --acl, no login is a 401, an operator sees the queues, and a retailer is refused another's with a 403."""
        from caps.auth import hash_password

        scratch = tempfile.TemporaryDirectory(prefix="caps-admin-")
        self.addCleanup(scratch.cleanup)

        def write(name, text):
            path = os.path.join(scratch.name, name)
            with open(path, "w") as f:
                f.write(text)
            return path

        passwords = write(
            "passwords.txt",
            f"ops:{hash_password('ops-pw', n=16)}\n"
            f"acme:{hash_password('acme-pw', n=16)}\n",
        )
        acl = write("acl.toml", '[ops]\nobserve = ["*"]\n[acme]\nconsume = ["*"]\n')
        broker, url = web_broker(
            self, "memory", "--auth", f"file:{passwords}", "--acl", acl
        )

        def run(*argv):
            out, err = io.StringIO(), io.StringIO()
            code = admin.main(["--url", url, *argv], out, err)
            return code, out.getvalue(), err.getvalue()

        code, out, err = run("queues")
        self.assertEqual(code, 1)
        self.assertIn("401 unauthorized: the broker needs a login", err)
        wrong = write("wrong.txt", "nope\n")
        code, out, err = run("--user", "ops", "--password-file", wrong, "queues")
        self.assertEqual(
            (code, err),
            (1, "caps.admin: 401 unauthorized: wrong clientId or password\n"),
        )
        ops = write("ops.txt", "ops-pw\n")
        code, out, err = run(
            "--user", "ops", "--password-file", ops, "--json", "queues"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["queues"], [])
        os.environ["CAPS_PASSWORD"] = "acme-pw"
        code, out, err = run("--user", "acme", "peek", "other", "delivered")
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("caps.admin: 403 forbidden: "), err)
