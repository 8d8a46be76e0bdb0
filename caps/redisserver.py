"""
A real Redis server of our own, for the tests, the benchmark and the local
cluster example: C{redis-server} on a free loopback port, in a temporary
directory of its own, with an append-only file fsynced at every write (so
data survives a SIGKILL) unless told otherwise, stopped by its PID.

When C{redis-server} or redis-py is missing, L{AVAILABLE} is false and
L{skip_reason} says why.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:
    redis = None

HOST = "127.0.0.1"
LOG = "redis.log"
# How long start() waits for PING, and how often it asks.
START_TIMEOUT = 10.0
POLL = 0.01
MAX_POLLS = int(START_TIMEOUT / POLL)
STOP_TIMEOUT = 10.0
# Fresh ports tried when another process takes the one picked first.
PORT_ATTEMPTS = 5
LOG_TAIL = 30


def _why_unavailable():
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    if redis is None:
        return "redis-py is not installed (pip install redis)"
    return None


skip_reason = _why_unavailable()
AVAILABLE = skip_reason is None


def free_port():
    """
    A loopback port nothing listens on now (another process may take it
    before the caller binds it: L{RedisServer.start} then tries another).
    """
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class RedisServer:
    """
    One C{redis-server} subprocess.

    @ivar args: extra command-line arguments, after the fixed ones
        (C{"--requirepass", "secret"}, C{"--replicaof", HOST, port}).
    @ivar password: the C{--requirepass} in C{args}, if any: the readiness
        check and L{client} use it.
    @ivar dir: the server's directory (C{--dir}): its append-only files and
        its log.  Removed by L{stop}.
    """

    def __init__(self, *args, sentinel=None):
        self.args = [str(arg) for arg in args]
        # A Sentinel's configuration (its "sentinel monitor ..." lines): run
        # as a Sentinel, from a file Sentinel may rewrite, instead of a
        # server.
        self.sentinel = sentinel
        self.password = None
        for option, value in zip(self.args, self.args[1:], strict=False):
            if option == "--requirepass":
                self.password = value
        self._dir = tempfile.TemporaryDirectory(prefix="caps-redis-")
        self.dir = self._dir.name
        self.log_path = os.path.join(self.dir, LOG)
        self._port = None
        self._process = None

    @property
    def port(self):
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def url(self):
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self):
        return self._process.pid

    @property
    def running(self):
        return self._process is not None and self._process.poll() is None

    def client(self, **kwargs):
        """
        A new C{redis.Redis} for this server (the caller closes it); keyword
        arguments go to C{redis.Redis}.
        """
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("password", self.password)
        return redis.Redis(HOST, self.port, **kwargs)

    def start(self):
        """
        Start on a free port and wait until it answers PING, trying a fresh
        port if another process took the one picked.

        @raise RuntimeError: with the tail of the log, if it does not come up.
        """
        if self.running:
            raise RuntimeError("the server is already running")
        for _ in range(PORT_ATTEMPTS):
            self._port = free_port()
            if self._launch():
                return self
        raise RuntimeError(
            f"redis-server found no free port in {PORT_ATTEMPTS} tries:\n"
            + self.log_tail()
        )

    def restart(self):
        """
        Start again on the same port and directory (after L{kill} or
        L{stop_process}): it reloads its append-only file.
        """
        if self._port is None:
            raise RuntimeError("the server has never been started")
        if self.running:
            raise RuntimeError("the server is still running")
        if not os.path.isdir(self.dir):
            raise RuntimeError("the server has been stopped: its directory is gone")
        if not self._launch():
            raise RuntimeError(
                f"port {self._port} was taken while the server was down:\n"
                + self.log_tail()
            )
        return self

    def _launch(self):
        """
        Run C{redis-server} on C{self._port} and wait for PING.

        @return: C{False} if the port was taken, C{True} once it answers.
        @raise RuntimeError: with the tail of the log, for anything else.
        """
        if self.sentinel is None:
            mode = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        else:
            config = os.path.join(self.dir, "sentinel.conf")
            if not os.path.exists(config):
                with open(config, "w") as f:
                    f.write(self.sentinel)
            mode = [config, "--sentinel"]
        command = [
            "redis-server",
            *mode,
            *("--port", str(self._port), "--bind", HOST, "--dir", self.dir),
            *("--daemonize", "no", "--protected-mode", "yes"),
            *("--logfile", self.log_path),
            *self.args,
        ]
        # Errors redis-server prints before it opens --logfile (a bad
        # argument) go to the same file.
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(
                command,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        probe = redis.Redis(
            HOST,
            self._port,
            password=self.password,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            for _ in range(MAX_POLLS):
                if self._answers(probe):
                    return True
                try:
                    # The wait between polls: also notices an early exit.
                    self._process.wait(timeout=POLL)
                except subprocess.TimeoutExpired:
                    if time.monotonic() < deadline:
                        continue
                    break
                if "Address already in use" in self.log_tail():
                    return False
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode}:\n"
                    + self.log_tail()
                )
        finally:
            probe.close()
        self._end(signal.SIGKILL)
        raise RuntimeError(
            f"redis-server did not answer PING within {START_TIMEOUT} s:\n"
            + self.log_tail()
        )

    def _answers(self, probe):
        """
        Whether our server (not another process that took the port) answers
        PING and has finished loading its data.
        """
        try:
            probe.ping()
            info = probe.info("server")
        except (redis.ConnectionError, redis.TimeoutError):
            # Refused, not listening yet, or LOADING (BusyLoadingError).
            return False
        return info.get("process_id") == self._process.pid

    def log_tail(self, lines=LOG_TAIL):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def kill(self):
        """
        SIGKILL, for crash tests: the directory stays, for L{restart}.
        """
        return self._end(signal.SIGKILL)

    def stop_process(self):
        """
        SIGTERM (SIGKILL after L{STOP_TIMEOUT}); the directory stays, for
        L{restart}.
        """
        return self._end(signal.SIGTERM)

    def stop(self):
        """
        End the process (as L{stop_process}) and remove the directory.  Safe
        to call more than once.
        """
        self.stop_process()
        self._dir.cleanup()

    def _end(self, signum):
        if self._process is None:
            return None
        if self._process.poll() is None:
            os.kill(self._process.pid, signum)
            try:
                self._process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self._process.pid, signal.SIGKILL)
                self._process.wait()
        return self._process.returncode
