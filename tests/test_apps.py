"""
Tests for the vendor and driver apps, against a broker in memory with time
driven by a fake clock, and once as processes against a real broker.
"""

import json
import re
import socket
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from caps import driver, vendor

from .helpers import MemoryNetwork
from .processes import RunningBroker

ORDER = re.compile(r"placed order (\S+)")
THANKS = re.compile(r"Thank you for delivering (\S+)")


class AppTests(SynchronousTestCase):
    def setUp(self):
        self.net = MemoryNetwork()
        self.out = []

    def vendor(self, store="acme-widgets", **kw):
        app = vendor.Vendor(
            self.net.client(), store, self.net.reactor, self.out.append, **kw
        )
        app.start()
        self.net.flush()
        return app

    def driver(self, name="ann", **kw):
        app = driver.Driver(
            self.net.client(), name, self.net.reactor, self.out.append, **kw
        )
        app.start()
        self.net.flush()
        return app

    def lines(self, pattern):
        return [m.group(1) for m in map(pattern.search, self.out) if m]

    def test_vendor_places_orders(self):
        """The vendor sends a pickup to the drivers every interval, with a store, order, customer and address."""
        self.vendor(interval=2.0, orders=3)
        self.net.advance(5)
        queue = self.net.broker.queue("driver", "pickup")
        entries = sorted(queue.entries(), key=lambda e: e.message.seq)
        payloads = [json.loads(e.message.payload) for e in entries]
        self.assertEqual(len(payloads), 3)
        for p in payloads:
            self.assertEqual(p["store"], "acme-widgets")
            self.assertEqual(set(p), {"store", "orderId", "customer", "address"})
        self.assertEqual(
            [e.message.id for e in entries],
            ["pickup:" + p["orderId"] for p in payloads],
        )
        self.assertEqual(self.lines(ORDER), [p["orderId"] for p in payloads])

    def test_whole_flow(self):
        """Orders are picked up, in transit, delivered and thanked for, each exactly once."""
        shop = self.vendor(interval=1.0, orders=4)
        ann = self.driver(delay=2.0)
        self.net.advance(10)
        orders = self.lines(ORDER)
        self.assertEqual(len(orders), 4)
        self.assertEqual(self.lines(THANKS), orders)
        self.assertEqual(self.lines(re.compile(r"DRIVER ann: picked up (\S+)")), orders)
        self.assertEqual(
            len([line for line in self.out if line.endswith("is in transit with ann")]),
            4,
        )
        self.assertEqual(ann.delivered, 4)
        self.successResultOf(shop.done)
        for event, client in (
            ("pickup", "driver"),
            ("delivered", "acme-widgets"),
            ("in-transit", "acme-widgets"),
        ):
            self.assertEqual(len(self.net.broker.queue(client, event)), 0, event)

    def test_pickup_acked_after_delivered(self):
        """The driver holds the pickup unacknowledged until delivered is confirmed."""
        self.vendor(interval=10.0, orders=1)
        self.driver(delay=5.0)
        self.net.advance(1)
        [order] = self.lines(ORDER)
        self.assertEqual(
            [e.message.id for e in self.net.broker.queue("driver", "pickup").entries()],
            ["pickup:" + order],
        )
        self.assertIn(f"DRIVER ann: {order} in transit", self.out)
        self.net.advance(5)
        self.assertIn(f"DRIVER ann: delivered {order}", self.out)
        self.assertEqual(len(self.net.broker.queue("driver", "pickup")), 0)

    def test_vendor_sees_only_its_store(self):
        """A vendor gets unaddressed deliveries for its store and never another store's."""
        self.vendor("acme-widgets", interval=100.0, orders=1)
        publisher = self.net.client()
        publisher.publish(
            "delivered", {"store": "acme-widgets", "orderId": "unaddressed"}
        )
        publisher.publish("delivered", {"store": "1-800-flowers", "orderId": "other"})
        publisher.publish(
            "delivered",
            {"store": "1-800-flowers", "orderId": "other2"},
            to="1-800-flowers",
        )
        self.net.flush()
        self.assertEqual(self.lines(THANKS), ["unaddressed"])

    def test_two_drivers_one_delivery(self):
        """A pickup handled by two drivers (after a reconnect) reaches the store once."""
        self.vendor(interval=100.0, orders=1)
        ann = self.driver("ann", delay=5.0)
        self.net.advance(1)
        [order] = self.lines(ORDER)
        # ann's connection breaks mid-delivery; bob gets the pickup again.
        bob = self.driver("bob", delay=1.0)
        ann_pump = self.net.pumps[1]
        self.net.drop(ann_pump)
        self.net.advance(12)
        self.assertEqual(self.lines(THANKS), [order])
        self.assertEqual(ann.delivered + bob.delivered, 2)
        self.assertEqual(len(self.net.broker.queue("driver", "pickup")), 0)

    def test_driver_skips_malformed(self):
        """A pickup without a usable store or orderId is logged and acknowledged."""
        self.driver()
        publisher = self.net.client()
        publisher.publish("pickup", {"orderId": "x"}, to="driver")
        publisher.publish("pickup", {"orderId": "y", "store": "bad store"}, to="driver")
        self.net.flush()
        self.assertEqual(
            len([line for line in self.out if "skipped a malformed order" in line]), 2
        )
        self.assertEqual(len(self.net.broker.queue("driver", "pickup")), 0)

    def test_driver_orders_limit(self):
        """A driver with --orders 2 delivers two; another driver takes the rest; nobody handles an order twice."""
        ann = self.driver("ann", delay=1.0, orders=2)
        bob = self.driver("bob", delay=1.0)
        publisher = self.net.client()
        for n in range(6):
            publisher.publish(
                "pickup", {"orderId": f"o{n}", "store": "acme"}, to="driver"
            )
        self.net.advance(8)
        self.successResultOf(ann.done)
        self.assertEqual((ann.delivered, bob.delivered), (2, 4))
        picked = self.lines(re.compile(r"DRIVER \S+: picked up (\S+)"))
        self.assertEqual(sorted(picked), [f"o{n}" for n in range(6)])
        self.assertEqual(len(self.net.broker.queue("driver", "pickup")), 0)


class OptionsTests(SynchronousTestCase):
    def test_vendor_options(self):
        """Numbers are coerced and defaults are documented values."""
        options = vendor.Options()
        options.parseOptions(
            ["--store", "1-800-flowers", "--interval", "0.5", "--orders", "3"]
        )
        self.assertEqual(
            (options["store"], options["interval"], options["orders"]),
            ("1-800-flowers", 0.5, 3),
        )
        self.assertEqual(options["broker"], ["tcp:localhost:3000"])

    def test_bad_options(self):
        """A bad store name or number is refused with a clear message."""
        from caps import app

        for argv in (
            ["--store", "no spaces"],
            ["--interval", "soon"],
            ["--orders", "0"],
        ):
            with self.assertRaises(SystemExit) as caught:
                app.parse(vendor.Options(), argv)
            self.assertIn("error:", str(caught.exception.code))

    def test_driver_options(self):
        """The driver takes a name, a delay and a broker endpoint."""
        options = driver.Options()
        options.parseOptions(
            ["--name", "bob", "--delay", "0", "--broker", "unix:/tmp/caps.sock"]
        )
        self.assertEqual(
            (options["name"], options["delay"], options["broker"]),
            ("bob", 0.0, ["unix:/tmp/caps.sock"]),
        )

    def test_several_brokers(self):
        """--broker (or -b) given twice keeps both descriptions, in order."""
        options = vendor.Options()
        options.parseOptions(["--broker", "tcp:a:3000", "-b", "unix:/tmp/b.sock"])
        self.assertEqual(options["broker"], ["tcp:a:3000", "unix:/tmp/b.sock"])

    def test_bad_second_broker(self):
        """A bad second --broker description is a usage error that names it."""
        from caps import app

        with self.assertRaises(SystemExit) as caught:
            app.parse(
                driver.Options(), ["--broker", "tcp:a:3000", "--broker", "nope:x"]
            )
        message = str(caught.exception.code)
        self.assertIn("error: bad --broker 'nope:x'", message)

    def test_one_broker_endpoint(self):
        """One --broker gives its own endpoint, as before; several give a RotatingEndpoint over them, in order."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
        from twisted.internet.testing import MemoryReactor

        from caps import app
        from caps.rotating import RotatingEndpoint

        reactor = MemoryReactor()
        one = app.broker_endpoint(reactor, ["tcp:localhost:3000"])
        self.assertIsInstance(one, TCP4ClientEndpoint)
        several = app.broker_endpoint(
            reactor, ["tcp:localhost:3000", "unix:/tmp/b.sock"]
        )
        self.assertIsInstance(several, RotatingEndpoint)
        self.assertEqual(several.names, ["tcp:localhost:3000", "unix:/tmp/b.sock"])
        self.assertEqual(
            [type(e) for e in several._endpoints],
            [TCP4ClientEndpoint, UNIXClientEndpoint],
        )


class AppProcessTests(SynchronousTestCase):
    """
    The real apps, as processes, against a real broker on 127.0.0.1.
    """

    def test_vendor_skips_a_dead_broker(self):
        """A vendor given a dead broker first and a live one second still places its order, and sees it delivered."""
        with socket.socket() as dead:
            # Bound but not listening: connections to it are refused.
            dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            broker = RunningBroker("memory")
            self.addCleanup(broker.stop)
            host, port = broker.address
            live = f"tcp:{host}:{port}"
            driver_app = self.app("driver", "--broker", live, "--delay", "0.2")
            vendor_app = self.app(
                "vendor",
                "--broker",
                f"tcp:127.0.0.1:{dead_port}",
                "--broker",
                live,
                "--orders",
                "1",
                "--interval",
                "0.2",
            )
            out, err = vendor_app.communicate(timeout=60)
        self.assertEqual(vendor_app.returncode, 0, err)
        [order] = ORDER.findall(out)
        self.assertEqual(THANKS.findall(out), [order])
        driver_app.terminate()
        driver_app.communicate(timeout=30)

    def app(self, module, *args):
        process = subprocess.Popen(
            [sys.executable, "-m", f"caps.{module}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(_kill, process)
        return process


def _kill(process):
    if process.poll() is None:
        process.kill()
        process.communicate()
