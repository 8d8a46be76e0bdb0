"""
The load of C{python -m caps.bench}: raw-socket clients, each run in a
process of its own so that none of them shares an interpreter (and its
lock) with another or with the benchmark.  They speak just enough of the
protocol (docs/protocol.md), with bytes templates and regular expressions
instead of a JSON codec: the load should cost as little CPU as it can,
since it shares the machine with the broker it measures.

Each client talks to the benchmark over a pipe: it sends C{("ready", x)}
when it is connected, waits for C{"go"}, and sends C{("done", result)}; a
failure is sent as C{("error", traceback)}.  Every socket wait is bounded
by L{TIMEOUT}.  Times are C{time.monotonic_ns()}: CLOCK_MONOTONIC, one
clock for every process on Linux, so a time taken in the producer can be
compared with one taken in the consumer.

Only the standard library here, so a client process starts fast.
"""

import json
import multiprocessing
import re
import selectors
import socket
import threading
import time
import traceback

from caps.bench.broker import raise_fd_limit

# A socket that makes no progress for this long is an error.
TIMEOUT = 60.0
QUEUE = b"bench"
EVENT = b"order"
# An order of about 200 bytes, as JSON, with its send time in
# nanoseconds added at the end ("sent").
PAYLOAD = {
    "store": "acme-widgets",
    "orderId": "2f1c7e8a-6a0e-4c1e-9b3c-8d7e6f5a4b3c",
    "customer": "Margaret Hamilton",
    "address": "4421 Maple Dr, Portland, OR",
    "items": 3,
}
_BODY = json.dumps(PAYLOAD, separators=(",", ":")).encode()[:-1]


def publish_frame(queue=QUEUE):
    """
    The publish template for C{queue}: C{frame % (id, sent)} is an order
    addressed to it, one line.
    """
    return (
        b'{"event":"'
        + EVENT
        + b'","to":"'
        + queue.replace(b"%", b"%%")
        + b'","id":%d,"payload":'
        + _BODY.replace(b"%", b"%%")
        + b',"sent":%d}}\n'
    )


def ack_head(queue=QUEUE):
    """
    The start of an acknowledgement of a message of C{queue}, up to its
    messageId (then L{ACK_TAIL}).
    """
    return (
        b'{"event":"received","payload":{"clientId":"'
        + queue
        + b'","event":"'
        + EVENT
        + b'","messageId":"'
    )


PUBLISH = publish_frame()
SUBSCRIBE = (
    b'{"event":"subscribe","id":0,"payload":{"clientId":"%s","event":"'
    + EVENT
    + b'"}}\n'
)
ACK_HEAD = ack_head()
ACK_TAIL = b'"}}\n'
PING = b'{"event":"ping","id":"end"}\n'
MESSAGE_ID = re.compile(rb'"messageId":\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
SENT = re.compile(rb'"sent":\s*(\d+)')
REPLY_ID = re.compile(rb'"id":\s*(\d+)')
ERROR = b'"error"'


def connect(address):
    """
    A connection to the broker, without Nagle's delay (the latency run
    writes one small frame at a time).
    """
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock, waiting_for):
    """
    The next bytes from C{sock}; a L{RuntimeError} saying what we were
    C{waiting_for} if none come within L{TIMEOUT} or the broker closes.
    """
    try:
        data = sock.recv(1 << 18)
    except TimeoutError:
        raise RuntimeError(
            f"nothing from the broker for {TIMEOUT:g} s, waiting for {waiting_for}"
        ) from None
    except ConnectionError as e:
        raise RuntimeError(f"{e.strerror}, waiting for {waiting_for}") from None
    if not data:
        raise RuntimeError(
            f"the broker closed the connection, waiting for {waiting_for}"
        )
    return data


def send(sock, data):
    """
    Send all of C{data}; a L{RuntimeError} if the broker reads none of it
    for L{TIMEOUT}.
    """
    try:
        sock.sendall(data)
    except TimeoutError:
        raise RuntimeError(f"the broker read nothing for {TIMEOUT:g} s") from None


def check(data, last=b""):
    """
    Raise L{RuntimeError} with the broker's error if C{data} (after the
    end of the previous chunk, C{last}) holds one.
    """
    if ERROR in data or ERROR in last[-16:] + data[:16]:
        text = (last[-16:] + data).decode("utf-8", "replace")
        line = next((x for x in text.splitlines() if '"error"' in x), text)
        raise RuntimeError(f"the broker refused a frame: {line}")


def publish(sock, count, window, latencies=None, frame=PUBLISH):
    """
    Publish C{count} orders with at most C{window} unconfirmed, as fast as
    confirmations come back; return when all are confirmed.  If
    C{latencies} is a list, append each publish-to-confirmation time to it
    (seconds).  C{frame} is the template (L{publish_frame}) of the queue.
    """
    sent = confirmed = 0
    sent_at = [0] * count if latencies is not None else None
    last = b""
    while confirmed < count:
        room = min(window - (sent - confirmed), count - sent)
        if room > 0:
            now = time.monotonic_ns()
            send(sock, b"".join([frame % (n, now) for n in range(sent, sent + room)]))
            if sent_at is not None:
                sent_at[sent : sent + room] = [now] * room
            sent += room
        data = receive(sock, f"confirmations ({confirmed} of {count} so far)")
        check(data, last)
        confirmed += data.count(b"\n")
        if sent_at is not None:
            last = last[last.rfind(b"\n") + 1 :] + data
            now = time.monotonic_ns()
            cut = last.rfind(b"\n") + 1
            for reply_id in REPLY_ID.findall(last, 0, cut):
                latencies.append((now - sent_at[int(reply_id)]) / 1e9)
        else:
            last = data


def publish_paced(sock, count, rate, frame=PUBLISH):
    """
    Publish C{count} orders (C{frame}, as for L{publish}) at C{rate} a
    second, each at its own deadline (start + n / rate, so a late send
    does not push the later ones back), and return the time to each
    confirmation (nanoseconds, in the order they came) and the time of
    the last send.  A thread reads the confirmations, so that each is
    timed when it comes.
    """
    sent_at = [0] * count
    confirm_ns = []
    failed = []

    def read_confirms():
        buffer = b""
        try:
            while len(confirm_ns) < count:
                data = receive(sock, f"confirmations ({len(confirm_ns)} of {count})")
                now = time.monotonic_ns()
                check(data, buffer)
                buffer += data
                cut = buffer.rfind(b"\n") + 1
                for reply_id in REPLY_ID.findall(buffer, 0, cut):
                    confirm_ns.append(now - sent_at[int(reply_id)])
                buffer = buffer[cut:]
        except BaseException as e:
            failed.append(e)

    reader = threading.Thread(target=read_confirms, daemon=True)
    reader.start()
    interval = 1e9 / rate
    start = time.monotonic_ns()
    for n in range(count):
        wait = start + int(n * interval) - time.monotonic_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        if failed:
            break
        sent_at[n] = now = time.monotonic_ns()
        send(sock, frame % (n, now))
    reader.join(TIMEOUT + 10)
    if failed:
        raise failed[0]
    if reader.is_alive():
        raise RuntimeError(f"no confirmation for {TIMEOUT:g} s")
    return confirm_ns, sent_at[-1]


def consume(sock, count, latencies=None, subscribed=None, head=ACK_HEAD):
    """
    Acknowledge C{count} deliveries, all those of each read in one write
    (each C{head}, from L{ack_head} for the queue, then its messageId);
    append the publish-to-delivery latency of each (nanoseconds) to
    C{latencies} if given, and call C{subscribed} once the subscription
    is confirmed.  A ping round trip at the end makes sure the broker has
    handled every acknowledgement; the time its pong came back is
    returned.
    """
    received = 0
    buffer = b""
    while received < count:
        data = receive(sock, f"deliveries ({received} of {count} so far)")
        now = time.monotonic_ns()
        check(data, buffer)
        buffer += data
        cut = buffer.rfind(b"\n") + 1
        if not cut:
            continue
        ids = MESSAGE_ID.findall(buffer, 0, cut)
        if ids:
            send(sock, head + (ACK_TAIL + head).join(ids) + ACK_TAIL)
            received += len(ids)
        if latencies is not None:
            latencies.extend(now - int(sent) for sent in SENT.findall(buffer, 0, cut))
        if subscribed is not None and b'"ok"' in buffer[:cut]:
            subscribed()
            subscribed = None
        buffer = buffer[cut:]
    send(sock, PING)
    while b'"pong"' not in buffer:
        buffer = buffer[-16:] + receive(sock, "the final pong")
    return time.monotonic_ns()


# What runs in each client process.


def producer(pipe, address, count, window, queue=QUEUE):
    """
    Publish C{count} orders to C{queue} when told to go, at most C{window}
    unconfirmed.
    """
    frame = publish_frame(queue)
    with connect(address) as sock:
        pipe.send(("ready", None))
        _wait_go(pipe)
        start = time.monotonic_ns()
        publish(sock, count, window, frame=frame)
        pipe.send(("done", {"start": start, "end": time.monotonic_ns()}))


def paced_producer(pipe, address, count, rate, queue=QUEUE):
    """
    Publish C{count} orders to C{queue} at a steady C{rate} a second when
    told to go.
    """
    frame = publish_frame(queue)
    with connect(address) as sock:
        pipe.send(("ready", None))
        _wait_go(pipe)
        start = time.monotonic_ns()
        confirm_ns, last_sent = publish_paced(sock, count, rate, frame)
        result = {"start": start, "last_sent": last_sent, "confirm_ns": confirm_ns}
        pipe.send(("done", result))


def consumer(pipe, address, count, latencies=False, wait_go=False, queue=QUEUE):
    """
    Subscribe to C{queue} (at once, or when told to go if C{wait_go}),
    acknowledge C{count} deliveries, and report when it subscribed and
    when the last acknowledgement was handled, with the latencies if
    asked for.
    """
    head = ack_head(queue)
    with connect(address) as sock:
        if wait_go:
            pipe.send(("ready", None))
            _wait_go(pipe)
            subscribed = None
        else:

            def subscribed():
                pipe.send(("ready", None))

        start = time.monotonic_ns()
        send(sock, SUBSCRIBE % queue)
        found = [] if latencies else None
        end = consume(sock, count, found, subscribed, head)
        pipe.send(("done", {"start": start, "end": end, "latency_ns": found}))


def idle_connections(pipe, address, count, batch=32):
    """
    Open C{count} connections when told to go, each subscribed as a client
    of its own (C{idle-N}), at most C{batch} waiting for their C{ok} at a
    time (fewer than the 50 connections a Twisted server lets wait to be
    accepted: past that, the kernel drops the handshake and the client
    tries again a second later); report when all got it, and close them
    all when told to.
    """
    sockets = []
    try:
        pipe.send(("ready", None))
        _wait_go(pipe)
        start = time.monotonic()
        with selectors.DefaultSelector() as selector:
            waiting = 0
            done = 0
            while done < count:
                while len(sockets) < count and waiting < batch:
                    sock = connect(address)
                    sockets.append(sock)
                    send(sock, SUBSCRIBE % (b"idle-%d" % len(sockets)))
                    sock.setblocking(False)
                    selector.register(sock, selectors.EVENT_READ, [b""])
                    waiting += 1
                ready = selector.select(TIMEOUT)
                if not ready:
                    raise RuntimeError(
                        f"no ok for {TIMEOUT:g} s: {done} of {count} connections subscribed"
                    )
                for key, _ in ready:
                    data = key.fileobj.recv(4096)
                    if not data:
                        raise RuntimeError(
                            f"the broker closed connection {done + 1} of {count}"
                        )
                    check(data)
                    key.data[0] += data
                    if b"\n" in key.data[0]:
                        selector.unregister(key.fileobj)
                        waiting -= 1
                        done += 1
        pipe.send(
            ("opened", {"connections": count, "seconds": time.monotonic() - start})
        )
        _wait_go(pipe, "close")
    finally:
        for sock in sockets:
            sock.close()
    pipe.send(("done", None))


def _wait_go(pipe, word="go"):
    message = pipe.recv()
    if message != word:
        raise RuntimeError(f"expected {word!r} from the benchmark, not {message!r}")


def _run(pipe, target, args):
    raise_fd_limit()
    try:
        target(pipe, *args)
    except BaseException:
        try:
            pipe.send(("error", traceback.format_exc()))
        except OSError:
            pass  # The benchmark stopped listening: it gave up on us.
    finally:
        pipe.close()


class Client:
    """
    One client process, seen from the benchmark.
    """

    def __init__(self, target, *args, name=None, alive=None):
        """
        Start C{target(pipe, *args)} in a new process; C{alive(grace=0)}
        is called every second while we wait for it, and with a grace
        period when it failed, and may raise (the broker died).
        """
        self.name = name or target.__name__
        self.alive = alive or (lambda grace=0: None)
        context = multiprocessing.get_context("forkserver")
        self.pipe, theirs = context.Pipe()
        self.process = context.Process(
            target=_run, args=(theirs, target, args), daemon=True
        )
        self.process.start()
        theirs.close()

    def expect(self, kind, timeout=TIMEOUT):
        """
        Wait for the message C{kind} from the client and return its value.
        """
        deadline = time.monotonic() + timeout
        while not self.pipe.poll(1.0):
            self.alive()
            if not self.process.is_alive() and not self.pipe.poll():
                raise RuntimeError(
                    f"the {self.name} process exited ({self.process.exitcode})"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {self.name} did not report {kind!r} in {timeout:g} s"
                )
        try:
            got, value = self.pipe.recv()
        except EOFError:
            raise RuntimeError(f"the {self.name} process exited") from None
        if got == "error":
            self.alive(1.0)  # A dead broker is the better explanation.
            raise RuntimeError(f"the {self.name} failed:\n{value}")
        if got != kind:
            raise RuntimeError(f"the {self.name} sent {got!r} instead of {kind!r}")
        return value

    def send(self, word):
        self.pipe.send(word)

    def stop(self, timeout=10.0):
        """
        Close the pipe (a client still waiting for a word from us ends),
        wait for the process to end, and stop it by its PID if it did not.
        """
        self.pipe.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
