"""
The real thing: `twistd -n caps-broker` as a subprocess, talked to over
loopback TCP with plain sockets.  Every process is stopped by its PID.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from caps.demo import LISTENING, broker_command

START_TIMEOUT = 30.0


class RunningBroker:
    """
    A broker subprocess listening on a free loopback port.
    """

    def __init__(self, store, *args):
        self.process = subprocess.Popen(
            broker_command(
                "--listen", "tcp:0:interface=127.0.0.1", "--store", store, *args
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.log = []
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode("utf-8", "replace")
            if not line:
                break
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                host, port = match.group(1).rsplit(":", 1)
                self.address = (host, int(port))
                return
        self.stop()
        raise AssertionError("broker did not start:\n" + "".join(self.log))

    def connect(self):
        sock = socket.create_connection(self.address, timeout=10)
        return sock, sock.makefile("rb")

    def stop(self):
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            rest = self.process.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            rest = self.process.communicate()[0]
        self.log.append(rest.decode("utf-8", "replace"))
        return self.process.returncode


def send(sock, obj):
    sock.sendall(json.dumps(obj).encode() + b"\n")


def read(reader):
    line = reader.readline()
    assert line.endswith(b"\n"), line
    return json.loads(line)


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
        log = "".join(broker.log)
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
