"""
The real thing: `twistd -n caps-broker` as a subprocess, talked to over
loopback TCP with plain sockets.  Every process is stopped by its PID.
"""

import os
import signal
import sqlite3
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from caps.demo import broker_command

from .processes import RunningBroker, read, send


class TwistdTests(SynchronousTestCase):
    def setUp(self):
        scratch = tempfile.TemporaryDirectory(prefix="caps-twistd-")
        self.addCleanup(scratch.cleanup)
        self.store = "sqlite:" + os.path.join(scratch.name, "caps.sqlite3")

    def start(self, *args):
        broker = RunningBroker(self.store, *args)
        self.addCleanup(broker.stop)
        return broker

    def test_serves_and_stops(self):
        """twistd -n caps-broker routes a message between two sockets and shuts down cleanly on SIGTERM."""
        broker = self.start()
        vendor, vendor_in = broker.connect()
        driver, driver_in = broker.connect()
        self.addCleanup(vendor.close)
        self.addCleanup(driver.close)
        send(
            driver,
            {
                "event": "subscribe",
                "id": 1,
                "payload": {"clientId": "driver", "event": "pickup"},
            },
        )
        self.assertEqual(read(driver_in)["event"], "ok")
        vendor.sendall(
            b'{"event":"pickup","to":"driver","id":2,"payload":{"orderId":"o1"}}\r\n'
        )
        self.assertEqual(read(vendor_in)["payload"]["queues"], 1)
        delivery = read(driver_in)
        self.assertEqual(
            (delivery["event"], delivery["payload"]), ("pickup", {"orderId": "o1"})
        )
        vendor.sendall(b"garbage\n")
        self.assertEqual(read(vendor_in)["payload"]["code"], "bad-json")
        # twistd shuts down, then re-raises the signal that stopped it.
        self.assertEqual(broker.stop(), -signal.SIGTERM)
        log = broker.text()
        self.assertIn("Server Shut Down.", log)
        self.assertIn('EVENT {"event": "pickup"', log)
        self.assertIn("bad-json", log)
        self.assertNotIn("Traceback", log)

    def test_line_limit_option(self):
        """--max-line on the command line sets the limit that closes the connection."""
        broker = self.start("--max-line", "50")
        sock, reader = broker.connect()
        self.addCleanup(sock.close)
        sock.sendall(b'{"event":"ping","payload":{"pad":"' + b"x" * 60 + b'"}}\n')
        self.assertEqual(read(reader)["payload"]["code"], "line-too-long")
        self.assertEqual(reader.readline(), b"")

    def test_port_in_use(self):
        """A broker that cannot listen exits 1 with a one-line reason."""
        broker = self.start()
        host, port = broker.address
        result = subprocess.run(
            broker_command(
                "--listen", f"tcp:{port}:interface={host}", "--store", "memory"
            ),
            capture_output=True,
            timeout=60,
        )
        output = (result.stdout + result.stderr).decode()
        self.assertEqual(result.returncode, 1, output)
        self.assertIn(f"cannot listen on tcp:{port}", output)
        self.assertNotIn("Traceback", output)

    def refused(self, *args):
        result = subprocess.run(
            broker_command("--listen", "tcp:0:interface=127.0.0.1", *args),
            capture_output=True,
            timeout=60,
        )
        output = (result.stdout + result.stderr).decode()
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        return output

    def test_store_in_use(self):
        """A second broker on the same store refuses to start, naming the first one's pid."""
        broker = self.start()
        output = self.refused("--store", self.store)
        self.assertIn("is in use by another broker", output)
        self.assertIn(f"pid {broker.process.pid}", output)

    def test_foreign_file(self):
        """A broker pointed at another program's database refuses to start, in one line."""
        path = self.store.split(":", 1)[1]
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE invoices (n INTEGER)")
        db.commit()
        db.close()
        output = self.refused("--store", self.store)
        self.assertIn("is not a CAPS store", output)
