"""
The process under test in C{python -m caps.bench}: a broker (or a relay)
started as a subprocess on a free loopback port, and what the benchmark
reads about it from /proc (Linux): CPU time and resident memory.
"""

import os
import resource
import selectors
import subprocess
import sys
import threading
import time

from caps.demo import LISTENING, broker_command

# How much of the end of a broker's log an error shows.
LOG_TAIL = 8192


def raise_fd_limit():
    """
    Raise this process's soft limit on open files to its hard limit, and
    return the new limit.  Child processes inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid):
    """
    CPU time a process has used, all its threads together: nanoseconds
    from each thread's /proc/PID/task/TID/schedstat, or clock ticks (10 ms)
    from /proc/PID/stat where the kernel keeps no schedstat.  A thread that
    exits between two readings takes its time with it; the broker's
    threads (the reactor and the store's writer) live as long as it does.
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except FileNotFoundError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_bytes(pid):
    """
    A process's resident memory now (VmRSS), in bytes.
    """
    return _status(pid, "VmRSS")


def peak_rss_bytes(pid):
    """
    The most resident memory a process has had (VmHWM), in bytes.
    """
    return _status(pid, "VmHWM")


class BrokerProcess:
    """
    A broker or relay subprocess, from the moment it listens until
    L{stop}; its log is read and thrown away but for the last few lines,
    which go into the error if it dies.
    """

    def __init__(self, command, timeout=30.0, store_pid=None):
        # The store's own server (Redis), whose CPU is reported beside
        # the broker's; or None.
        self.store_pid = store_pid
        raise_fd_limit()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid
        self.tail = b""
        try:
            self.address = self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        # Keep reading its log, so that it never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _wait_listening(self, timeout):
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"the broker did not listen within {timeout:g} s:\n"
                        + self.log()
                    )
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.process.wait(timeout=10)
                    raise RuntimeError(
                        f"the broker exited with {self.process.returncode} "
                        "before it listened:\n" + self.log()
                    )
                self.tail = (self.tail + chunk)[-LOG_TAIL:]
                match = LISTENING.search(self.log())
                if match:
                    host, port = match.group(1).rsplit(":", 1)
                    return host, int(port)

    def _drain(self):
        fd = self.process.stdout.fileno()
        try:
            while chunk := os.read(fd, 1 << 16):
                self.tail = (self.tail + chunk)[-LOG_TAIL:]
        except (OSError, ValueError):
            pass  # The pipe was closed by stop().

    def log(self):
        """
        The last lines the process wrote.
        """
        return self.tail.decode("utf-8", "replace")

    def check(self, grace=0.0):
        """
        Raise L{RuntimeError}, with its last lines, if the process exited
        or exits within C{grace} seconds.
        """
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the broker exited with {self.process.returncode}:\n" + self.log()
            )

    def stop(self, timeout=10.0):
        """
        Stop the process by its PID: SIGTERM, then SIGKILL after C{timeout}.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(timeout)
        self.process.stdout.close()


def broker_process(args, relay=False, store_pid=None, wrap=(), timeout=30.0):
    """
    Start C{caps.relay} with C{args}, or a broker (twistd caps-broker)
    listening on a free loopback port with C{args}; through the command
    C{wrap} if given (valgrind ...), and with C{timeout} seconds to listen.
    """
    if relay:
        command = (sys.executable, "-m", "caps.relay", *args)
    else:
        # One producer connection publishes as fast as it can, and the
        # connection benchmark opens 10,000 connections from one address:
        # no per-connection rate or per-address limit.
        command = broker_command(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--max-rate",
            "0",
            "--max-connections",
            "100000",
            "--max-connections-per-address",
            "100000",
            *args,
        )
    return BrokerProcess((*wrap, *command), timeout, store_pid)
