"""
The web pages in a real browser: headless Chromium (Debian's chromium and
chromium-driver), driven by selenium, against a real broker started with
--web.  Messages are published over the broker's raw TCP protocol; the
pages must show them live, recover by themselves when the broker restarts,
and show payloads as text (no XSS).

Screenshots of both pages are kept as test artifacts, in $CAPS_ARTIFACTS
or a temporary directory (the path is printed).

Skipped, saying why, only where chromium, chromedriver or selenium is
missing; CI (.ci/run) installs them.
"""

import json
import os
import re
import shutil
import tempfile
import time
import unittest

from twisted.trial.unittest import SynchronousTestCase

from .processes import RunningBroker

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None

WAIT = 20.0  # seconds any one thing may take to show on a page
LOOPBACK = "tcp:0:interface=127.0.0.1"
# The web listener's line in the broker's log (caps/web).
WEB_LISTENING = re.compile(r"CAPS web listening on (\S+):(\d+)")
STORE = "acme-widgets"
XSS = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)


def find_browser():
    """
    (chromium, chromedriver) paths, or a reason to skip.
    """
    if webdriver is None:
        return None, "selenium is not installed (pip install selenium)"
    names = os.environ.get("CAPS_CHROMIUM", "chromium chromium-browser").split()
    chromium = next(filter(None, map(shutil.which, names)), None)
    driver = shutil.which(os.environ.get("CAPS_CHROMEDRIVER", "chromedriver"))
    if not chromium:
        return None, "chromium is not installed (apt-get install chromium)"
    if not driver:
        return None, "chromedriver is not installed (apt-get install chromium-driver)"
    return (chromium, driver), None


def artifacts():
    """
    The directory screenshots go to: $CAPS_ARTIFACTS, or a new temporary one.
    """
    global _artifacts
    if _artifacts is None:
        _artifacts = os.environ.get("CAPS_ARTIFACTS") or tempfile.mkdtemp(
            prefix="caps-browser-"
        )
        os.makedirs(_artifacts, exist_ok=True)
        print(f"browser test screenshots in {_artifacts}")
    return _artifacts


_artifacts = None


class Broker:
    """
    A broker with --web on loopback, restartable on the same two ports.
    """

    def __init__(self, testcase):
        self.testcase = testcase
        self.running = None
        self.listen = LOOPBACK
        self.web = LOOPBACK
        self.start()

    def start(self):
        self.running = RunningBroker(
            "memory", "--web", self.web, "--idle-timeout", "600", listen=self.listen
        )
        host, port = self.running.address
        self.listen = f"tcp:{port}:interface={host}"
        try:
            match = self.running.wait_for(WEB_LISTENING, WAIT)
        except AssertionError as e:
            self.stop()
            self.testcase.fail(str(e))
        self.url = f"http://{match.group(1)}:{match.group(2)}"
        self.web = f"tcp:{match.group(2)}:interface={match.group(1)}"

    def stop(self):
        if self.running is not None:
            self.running.stop()
            self.running = None

    def publish(self, event, to, payload, sock=None):
        """
        Publish over a connection of its own and wait for the broker's ok.
        """
        own = sock is None
        if own:
            sock, reader = self.running.connect()
        else:
            sock, reader = sock
        try:
            frame = {"event": event, "to": to, "id": 1, "payload": payload}
            sock.sendall(json.dumps(frame).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if reply.get("id") == 1:
                    break
            self.testcase.assertEqual(reply["event"], "ok", reply)
        finally:
            if own:
                reader.close()
                sock.close()

    def client(self, subscriptions):
        """
        A connection subscribed to (clientId, event, filter), left open (it
        shows on the operator's page); closed at the end of the test.
        """
        sock, reader = self.running.connect()
        for n, (client_id, event, filter) in enumerate(subscriptions, 1):
            frame = {
                "event": "subscribe",
                "id": n,
                "payload": {"clientId": client_id, "event": event, "filter": filter},
            }
            sock.sendall(json.dumps(frame).encode() + b"\n")
            while json.loads(reader.readline()).get("id") != n:
                pass
        self.testcase.addCleanup(sock.close)
        self.testcase.addCleanup(reader.close)
        return sock, reader


class BrowserTests(SynchronousTestCase):
    def setUp(self):
        paths, reason = find_browser()
        if paths is None:
            raise unittest.SkipTest(reason)
        self.broker = Broker(self)
        self.addCleanup(self.broker.stop)
        self.browser = self.chromium(*paths)

    def chromium(self, binary, driver_path):
        profile = tempfile.mkdtemp(prefix="caps-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument("--window-size=1280,900")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=driver_path, log_output=os.devnull)
        browser = webdriver.Chrome(service=service, options=options)
        self.addCleanup(browser.quit)
        browser.set_page_load_timeout(WAIT)
        browser.set_script_timeout(WAIT)
        return browser

    def wait(self, condition, what):
        """
        Wait up to WAIT seconds for C{condition(browser)} to be truthy.
        """
        try:
            return WebDriverWait(self.browser, WAIT, poll_frequency=0.1).until(
                condition
            )
        except TimeoutException:
            self.screenshot("failed-" + self.id().rsplit(".", 1)[-1])
            self.fail(
                f"not within {WAIT:.0f} s: {what}\n"
                f"page text:\n{self.browser.find_element('tag name', 'body').text}\n"
                f"browser log: {self.console()}\n"
                f"broker log:\n{self.broker.running.text() if self.broker.running else ''}"
            )

    def check_console(self, *expected):
        """
        Nothing went wrong in the page (a script error, a refused resource
        or script under the Content-Security-Policy) but what C{expected}
        patterns match.
        """
        errors = [
            entry["message"]
            for entry in self.console()
            if entry["level"] == "SEVERE"
            and not any(re.search(p, entry["message"]) for p in expected)
        ]
        self.assertEqual(errors, [])

    def console(self):
        try:
            return self.browser.get_log("browser")
        except Exception:  # not every driver keeps one
            return []

    def status(self):
        return self.browser.find_element("id", "status").text

    def wait_status(self, text):
        self.wait(lambda b: self.status() == text, f"the indicator says {text!r}")

    def orders(self):
        """
        The store page's rows, top to bottom: (orderId, status) as shown.
        """
        return [
            tuple(row)
            for row in self.browser.execute_script(
                "return [...document.querySelectorAll('#orders tbody tr')]"
                ".map(r => [r.cells[0].textContent, r.dataset.status])"
            )
        ]

    def open(self, path):
        self.browser.get(self.broker.url + path)
        # Gone if the page is ever reloaded.
        self.browser.execute_script("window.capsNotReloaded = true")

    def not_reloaded(self):
        return self.browser.execute_script("return window.capsNotReloaded === true")

    def settled(self):
        """
        Wait for the highlights of new rows to fade, for a clean picture.
        """
        self.wait(
            lambda b: b.execute_script("return document.getAnimations().length") == 0,
            "the animations to end",
        )

    def screenshot(self, name):
        path = os.path.join(artifacts(), name + ".png")
        self.browser.save_screenshot(path)
        print(f"screenshot: {path}")
        return path

    def test_store_page_live_and_recovers(self):
        """
        The store page shows what happened before it opened, then a delivery
        as it happens, without reload; after the broker restarts on the same
        ports, it reconnects by itself and shows the new broker's deliveries.
        """
        before = {"store": STORE, "orderId": "o-0", "customer": "Ada Lovelace"}
        self.broker.publish("pickup", "driver", before)
        self.open(f"/store/{STORE}")
        self.wait(lambda b: self.orders() == [("o-0", "pickup")], "the replayed o-0")
        self.wait_status("live")

        started = time.monotonic()
        self.broker.publish(
            "delivered",
            STORE,
            {"store": STORE, "orderId": "o-1", "driver": "ann"},
        )
        self.wait(
            lambda b: ("o-1", "delivered") in self.orders(), "o-1 delivered, live"
        )
        print(f"live delivery shown in {time.monotonic() - started:.2f} s")
        self.assertEqual(self.orders(), [("o-1", "delivered"), ("o-0", "pickup")])

        stopped = time.monotonic()
        self.broker.stop()
        self.wait_status("reconnecting…")
        self.broker.start()
        self.broker.publish(
            "delivered",
            STORE,
            {"store": STORE, "orderId": "o-2", "driver": "bob"},
        )
        self.wait(
            lambda b: ("o-2", "delivered") in self.orders(),
            "o-2 delivered by the restarted broker",
        )
        self.wait_status("live")
        print(f"o-2 shown {time.monotonic() - stopped:.2f} s after the broker stopped")
        self.assertEqual(
            self.orders(),
            [("o-2", "delivered"), ("o-1", "delivered"), ("o-0", "pickup")],
        )
        self.assertTrue(self.not_reloaded())
        self.assertIn("restarted", self.browser.find_element("id", "notice").text)

        # Later news of an order moves its one row, and only once.
        self.broker.publish(
            "delivered", STORE, {"store": STORE, "orderId": "o-0", "driver": "bob"}
        )
        self.wait(lambda b: self.orders()[0] == ("o-0", "delivered"), "o-0 on top")
        self.assertEqual(
            self.orders(),
            [("o-0", "delivered"), ("o-2", "delivered"), ("o-1", "delivered")],
        )
        # The stream cut by the stop, the retries while the broker was away.
        self.check_console(r"/api/\S+ - Failed to load resource: net::ERR_")

    def test_payloads_shown_as_text(self):
        """
        A payload with HTML in it is shown as that text on both pages, and
        none of it runs: not replayed, not live.
        """
        hostile = {"store": STORE, "orderId": XSS, "driver": XSS, "customer": XSS}
        self.broker.publish("in-transit", STORE, hostile)
        self.open(f"/store/{STORE}")
        self.wait(lambda b: self.orders() == [(XSS, "in-transit")], "the replay")
        self.wait_status("live")
        self.broker.publish("delivered", STORE, hostile)
        self.wait(lambda b: self.orders() == [(XSS, "delivered")], "the live one")
        self.check_inert("#orders tbody")
        cells = self.browser.execute_script(
            "return [...document.querySelectorAll('#orders tbody td')]"
            ".map(c => c.textContent)"
        )
        self.assertEqual(cells.count(XSS), 3, cells)

        self.open("/")
        self.wait(
            lambda b: XSS in b.find_element("id", "recent").text,
            "the payload in the operator's recent messages",
        )
        self.check_inert("#recent tbody")
        self.check_console()

    def check_inert(self, where):
        self.assertIsNone(self.browser.execute_script("return window.pwned"))
        elements = self.browser.execute_script(
            f"return document.querySelectorAll('{where} script, {where} img').length"
        )
        self.assertEqual(elements, 0)

    def test_operator_page(self):
        """
        The operator's page shows each queue with its counts, the totals and
        the connected clients, live; screenshots of both pages are kept.
        """
        # Subscribed as the apps are: a store gets its own store's news only.
        driver = self.broker.client([("driver", "pickup", {})])
        mine = {"store": STORE}
        vendor = self.broker.client(
            [(STORE, "in-transit", mine), (STORE, "delivered", mine)]
        )
        self.open("/")
        self.wait_status("live")
        self.wait(
            lambda b: "driver" in b.find_element("id", "clients").text,
            "the connected clients",
        )

        orders = [
            ("o-1001", "Ada Lovelace", "ann", "delivered"),
            ("o-1002", "Grace Hopper", "ann", "delivered"),
            ("o-1003", "Alan Turing", "bob", "in-transit"),
            ("o-1004", "Barbara Liskov", "bob", "in-transit"),
            ("o-1005", "Donald Knuth", None, "pickup"),
            ("o-1006", "Edsger Dijkstra", None, "pickup"),
        ]
        published = 0
        for order_id, customer, name, step in orders:
            order = {"store": STORE, "orderId": order_id, "customer": customer}
            self.broker.publish("pickup", "driver", order, sock=vendor)
            published += 1
            for event in ("in-transit", "delivered")[
                : ("pickup", "in-transit", "delivered").index(step)
            ]:
                self.broker.publish(event, STORE, dict(order, driver=name), sock=driver)
                published += 1
        self.broker.publish(
            "delivered", "other-store", {"store": "other-store", "orderId": "x-1"}
        )
        published += 1

        def row(client_id, event):
            return self.browser.execute_script(
                "for (const r of document.querySelectorAll('#queues tbody tr'))"
                "  if (r.cells[0].textContent === arguments[0]"
                "      && r.cells[1].textContent === arguments[1])"
                "    return [...r.cells].map(c => c.textContent);"
                "return null",
                client_id,
                event,
            )

        # clientId, event, depth, in flight, dead letters, consumers, ...
        self.wait(
            lambda b: (
                (row("other-store", "delivered") or [None] * 6)[2] == "1"
                and (row(STORE, "delivered") or [None] * 6)[5] == "1"
            ),
            "the queues with their depths and consumers",
        )
        self.wait(
            lambda b: (
                b.find_element("css selector", '[data-total="published"]').text
                == str(published)
            ),
            "the total published",
        )
        self.wait(
            lambda b: "x-1" in b.find_element("id", "recent").text,
            "the latest message",
        )
        self.assertIsNone(self.browser.execute_script("return window.pwned"))
        self.settled()
        self.screenshot("dashboard-operator")

        self.open(f"/store/{STORE}")
        self.wait(lambda b: len(self.orders()) == 6, "the store's six orders")
        self.assertEqual(
            self.orders(),
            [
                ("o-1006", "pickup"),
                ("o-1005", "pickup"),
                ("o-1004", "in-transit"),
                ("o-1003", "in-transit"),
                ("o-1002", "delivered"),
                ("o-1001", "delivered"),
            ],
        )
        self.wait_status("live")
        self.screenshot("dashboard-store")
        self.browser.set_window_size(390, 844)
        self.screenshot("dashboard-store-phone")
        self.check_console()

        # The operator's page starts over with a new broker: its counts.
        self.browser.set_window_size(1280, 900)
        self.open("/")
        self.wait_status("live")
        self.broker.stop()
        self.wait_status("reconnecting…")
        self.broker.start()
        self.broker.publish("delivered", STORE, {"store": STORE, "orderId": "o-2001"})
        self.wait(
            lambda b: (
                b.find_element("css selector", '[data-total="published"]').text == "1"
                and "o-2001" in b.find_element("id", "recent").text
                and "o-1006" not in b.find_element("id", "recent").text
            ),
            "the new broker's counts and messages only",
        )
        self.assertIn("restarted", self.browser.find_element("id", "notice").text)
        self.assertTrue(self.not_reloaded())
