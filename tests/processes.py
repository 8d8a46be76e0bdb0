"""
A real broker process for tests: `twistd -n caps-broker` on a free
loopback port, its log drained on a thread (so it never blocks on a full
pipe), and stopped by its PID.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time

from caps.demo import LISTENING, broker_command

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class RunningBroker:
    """
    A broker subprocess.  C{address} is (host, port) once it listens.
    """

    def __init__(self, store, *args, listen="tcp:0:interface=127.0.0.1"):
        self.process = subprocess.Popen(
            broker_command("--listen", listen, "--store", store, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.log = []
        # Notified at each line of the log, and when it ends
        self._grew = threading.Condition()
        self._ended = False
        self.address = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self._listening.wait(START_TIMEOUT)
        if self.address is None:
            self.stop()
            raise AssertionError("broker did not start:\n" + self.text())

    def _drain(self):
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            with self._grew:
                self.log.append(line)
                self._grew.notify_all()
            match = LISTENING.search(line)
            if match and self.address is None:
                host, port = match.group(1).rsplit(":", 1)
                self.address = (host, int(port))
                self._listening.set()
        with self._grew:
            self._ended = True
            self._grew.notify_all()
        self._listening.set()

    def text(self):
        return "".join(self.log)

    def wait_for(self, pattern, timeout=START_TIMEOUT):
        """
        Wait until the log matches C{pattern} (a compiled regular
        expression), and return the match.

        @raise AssertionError: with the log, if it does not match within
            C{timeout} seconds or the broker's output ends first.
        """
        deadline = time.monotonic() + timeout
        with self._grew:
            while not (match := pattern.search(self.text())):
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    raise AssertionError(
                        f"no {pattern.pattern!r} in the broker's log:\n{self.text()}"
                    )
                self._grew.wait(left)
        return match

    def connect(self):
        sock = socket.create_connection(self.address, timeout=10)
        return sock, sock.makefile("rb")

    def kill(self):
        """
        SIGKILL: the broker gets no chance to write anything more.
        """
        return self._end(signal.SIGKILL)

    def stop(self):
        """
        SIGTERM, then SIGKILL if it has not ended in time.
        """
        return self._end(signal.SIGTERM)

    def _end(self, signum):
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(STOP_TIMEOUT)
        self.process.stdout.close()
        return self.process.returncode


def send(sock, obj):
    sock.sendall(json.dumps(obj).encode() + b"\n")


def read(reader):
    line = reader.readline()
    assert line.endswith(b"\n"), line
    return json.loads(line)
