"""
The whole CAPS scene in one command, on loopback:

    python -m caps.demo

A broker, two vendors (acme-widgets and 1-800-flowers) and two drivers (ann
and bob), each its own process.  Midway, 1-800-flowers is stopped while the
drivers go on delivering its orders; then the broker is killed (SIGKILL)
and started again on the same SQLite store; when 1-800-flowers comes back
it catches up on what it missed before it goes on live.  At the end the demo counts, from
the apps' own logs, the orders placed, delivered and acknowledged, and the
ones lost or logged twice (both must be 0), and exits 0 only if so.
"""

import contextlib
import os
import re
import sys
import tempfile
from collections import Counter

import attrs
from twisted.internet import defer, error, protocol, task
from twisted.python import usage

from caps import app
from caps.options import positive_int, seconds

TWISTD = (
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
)
LISTENING = re.compile(r"CAPS broker listening on (\S+)")
PLACED = re.compile(r"^VENDOR (\S+): placed order (\S+)")
THANKS = re.compile(r"^VENDOR (\S+): Thank you for delivering (\S+)")
DELIVERED = re.compile(r"^DRIVER (\S+): delivered (\S+)")


class Child(protocol.ProcessProtocol):
    """
    A process of the scene: its output lines, kept and shown to the scene.
    """

    def __init__(self, scene, name, echo=None):
        self.scene = scene
        self.name = name
        self.echo = echo
        self.lines = []
        self.errors = []
        self.ended = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd, data):
        *complete, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if fd == 2:
                self.errors.append(line)
                continue
            self.lines.append(line)
            if self.echo is not None:
                self.echo(line)
            self.scene.changed()

    def processEnded(self, reason):
        # The exit code, or minus the signal that ended the process.
        code = reason.value.exitCode
        self.ended.callback(-reason.value.signal if code is None else code)
        self.scene.changed()

    def matches(self, pattern):
        return [m.group(2) for m in map(pattern.search, self.lines) if m]

    def signal(self, name):
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


@attrs.define(eq=False)
class Scene:
    """
    The processes of one run of the scene, and what they printed.
    """

    reactor: object
    timeout: float
    children: list = attrs.Factory(list)
    _waiters: list = attrs.Factory(list)

    def spawn(self, name, argv, echo=None):
        child = Child(self, name, echo)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.reactor.spawnProcess(child, argv[0], list(argv), env=env)
        self.children.append(child)
        return child

    def changed(self):
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate():
                self._waiters.remove(waiter)
                d.callback(None)

    def until(self, what, predicate):
        """
        Wait until C{predicate()} holds, checked as output arrives; fail
        after the scene's time-out, saying C{what} was awaited.
        """
        if predicate():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((predicate, d))

        def timed_out(failure):
            failure.trap(defer.CancelledError)
            raise RuntimeError(f"gave up after {self.timeout} s waiting for {what}")

        return d.addTimeout(self.timeout, self.reactor).addErrback(timed_out)

    def count(self, pattern):
        return [order for c in self.children for order in c.matches(pattern)]

    def summary(self):
        placed = set(self.count(PLACED))
        delivered = set(self.count(DELIVERED))
        thanks = self.count(THANKS)
        return {
            "placed": len(placed),
            "delivered": len(delivered),
            "acknowledged": len(set(thanks)),
            "lost": len(placed - set(thanks)),
            "duplicated": sum(n - 1 for n in Counter(thanks).values()),
        }

    async def stop_all(self):
        """
        Stop every process still running, by its PID: politely, then with
        SIGKILL after 10 seconds.
        """
        for child in self.children:
            if not child.ended.called:
                child.signal("TERM" if child.name.startswith("broker") else "INT")
        for child in self.children:
            if not child.ended.called:
                try:
                    await _ended(child).addTimeout(10.0, self.reactor)
                except defer.TimeoutError:
                    child.signal("KILL")
                    await _ended(child)


def _ended(child):
    d = defer.Deferred()
    child.ended.addBoth(lambda result: (d.callback(result), result)[1])
    return d


def app_command(module, *args):
    return (sys.executable, "-m", module, *args)


def broker_command(*args):
    return TWISTD + ("-n", "--pidfile=", "--logfile=-", "caps-broker") + args


async def start_broker(
    scene, store, listen="tcp:0:interface=127.0.0.1", *args, name="broker"
):
    """
    Start a broker on C{store} and return its process and address.
    """
    broker = scene.spawn(
        name, broker_command("--listen", listen, "--store", store, *args)
    )
    await scene.until(
        "the broker to listen",
        lambda: broker.ended.called or any(map(LISTENING.search, broker.lines)),
    )
    if broker.ended.called:
        raise RuntimeError("the broker exited:\n" + "\n".join(broker.errors))
    return broker, next(filter(None, map(LISTENING.search, broker.lines))).group(1)


async def run_scene(
    reactor,
    workdir,
    orders=8,
    interval=0.5,
    delay=0.8,
    echo=None,
    timeout=60.0,
    store=None,
    brokers=1,
):
    """
    Play the scene, with the broker's store in C{workdir} (or C{store}, a
    store description such as a Redis URL), and return the L{Scene}.
    With several C{brokers} (C{store} must be Redis), they share it
    (C{--shared}), every app is given them all, each starting with a
    different one, and the broker killed midway is not started again: its
    clients go on through the others.  Every process started is stopped by
    its PID before this returns, whatever happens.
    """
    scene = Scene(reactor, timeout)
    say = echo or (lambda line: None)
    if store is None:
        store = "sqlite:" + os.path.join(workdir, "caps.sqlite3")
    shared = ("--shared",) if brokers > 1 else ()
    try:
        started = []
        for i in range(brokers):
            name = "broker" if brokers == 1 else f"broker {i + 1}"
            started.append(
                await start_broker(
                    scene, store, "tcp:0:interface=127.0.0.1", *shared, name=name
                )
            )
            say(f"DEMO: {name} listening on {started[-1][1]}, store {store}")
        broker, address = started[0]
        host, port = address.rsplit(":", 1)
        endpoints = ["tcp:" + a for _, a in started]
        turn = iter(range(1_000_000))

        def brokers_for():
            """
            Every broker, as repeated --broker options, starting with the
            next one in turn.
            """
            first = next(turn) % len(endpoints)
            rotated = endpoints[first:] + endpoints[:first]
            return [arg for e in rotated for arg in ("--broker", e)]

        for name, seconds in (("ann", delay), ("bob", delay * 1.5)):
            scene.spawn(
                "driver " + name,
                app_command(
                    "caps.driver",
                    *brokers_for(),
                    "--name",
                    name,
                    "--delay",
                    str(seconds),
                ),
                echo,
            )

        def vendor(store, count):
            return scene.spawn(
                "vendor " + store,
                app_command(
                    "caps.vendor",
                    *brokers_for(),
                    "--store",
                    store,
                    "--interval",
                    str(interval),
                    "--orders",
                    str(count),
                ),
                echo,
            )

        acme = vendor("acme-widgets", orders)
        half = max(1, orders // 2)
        flowers = vendor("1-800-flowers", half + 1)
        await scene.until(
            f"1-800-flowers to place {half} orders",
            lambda: len(flowers.matches(PLACED)) >= half,
        )
        say("DEMO: stopping 1-800-flowers while the drivers keep delivering its orders")
        flowers.signal("INT")
        await scene.until("1-800-flowers to stop", lambda: flowers.ended.called)

        missed = set(flowers.matches(PLACED)) - set(flowers.matches(THANKS))
        await scene.until(
            "the drivers to deliver 1-800-flowers' orders",
            lambda: missed <= set(scene.count(DELIVERED)),
        )
        if brokers > 1:
            say(
                f"DEMO: {len(missed)} deliveries for 1-800-flowers are waiting in "
                f"its queue; killing broker 1 of {brokers} with SIGKILL: its "
                "clients go on through the others"
            )
            broker.signal("KILL")
            await scene.until("broker 1 to die", lambda: broker.ended.called)
            say("DEMO: restarting 1-800-flowers")
        else:
            say(
                f"DEMO: {len(missed)} deliveries for 1-800-flowers are waiting in "
                "its queue; killing the broker with SIGKILL and starting it again"
            )
            broker.signal("KILL")
            await scene.until("the broker to die", lambda: broker.ended.called)
            await start_broker(scene, store, f"tcp:{port}:interface={host}")
            say("DEMO: broker back on the same store; restarting 1-800-flowers")
        flowers = vendor("1-800-flowers", half)
        await scene.until(
            "both vendors to see all their orders delivered",
            lambda: acme.ended.called and flowers.ended.called,
        )
        say("DEMO: all orders delivered; stopping the drivers and the broker")
    finally:
        await scene.stop_all()
    return scene


class Options(usage.Options):
    optFlags = [
        [
            "redis",
            None,
            "Keep the broker's store in a Redis server of the demo's own "
            "(Debian's redis-server on a free loopback port; pip install "
            "'.[redis]') instead of an SQLite file.",
        ],
    ]
    optParameters = [
        [
            "brokers",
            "b",
            1,
            "With --redis: run this many brokers sharing the Redis server "
            "(--shared); the one killed midway stays dead and its clients "
            "move to the others.",
            positive_int,
        ],
        ["orders", "n", 8, "Orders acme-widgets places.", positive_int],
        ["interval", "i", 0.5, "Seconds between a vendor's orders.", seconds],
        ["delay", "d", 0.8, "Seconds a driver takes to deliver.", seconds],
    ]

    def postOptions(self):
        if self["brokers"] > 1 and not self["redis"]:
            raise usage.UsageError("--brokers needs --redis (they share it)")
        if self["redis"]:
            from caps import redisserver

            if not redisserver.AVAILABLE:
                raise usage.UsageError(f"--redis: {redisserver.skip_reason}")


async def main(reactor, *argv):
    options = app.parse(Options(), argv)
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="caps-demo-"))
        store = None
        if options["redis"]:
            from caps.redisserver import RedisServer

            server = RedisServer().start()
            stack.callback(server.stop)
            store = server.url
        scene = await run_scene(
            reactor,
            workdir,
            orders=options["orders"],
            interval=options["interval"],
            delay=options["delay"],
            echo=app.emit,
            store=store,
            brokers=options["brokers"],
        )
    summary = scene.summary()
    app.emit(
        "DEMO summary: "
        + ", ".join(f"{name} {value}" for name, value in summary.items())
    )
    if summary["lost"] or summary["duplicated"] or not summary["placed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
