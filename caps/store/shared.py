"""
The link of a broker that shares its Redis with other brokers
(C{--shared}): the scripts of L{caps.store.sharedlayout} run in groups on
one writer thread, each with its own answer, and the other brokers' news
comes in on a pub/sub listener thread.  The reactor never waits for Redis.

Unlike the write-behind stores, nothing here records the broker's changes
after the fact: L{caps.sharedbroker.SharedBroker} asks Redis first, and
acts on the answer.

Every script call of one pass of the reactor goes out in one pipeline: one
round trip.  A call that can safely run twice (giving back, acknowledging,
saving a subscription) is tried again, in order, after a failed round trip;
one that cannot (a publish, a claim) fails with L{StoreUnavailable}: the
client was not told C{ok}, and a claim whose answer was lost is undone by
L{UNCLAIM<caps.store.sharedlayout.UNCLAIM>}.
"""

import json
import os
import threading
import time
import uuid

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from caps.queue import Queue
from caps.store import (
    UNAVAILABLE,
    NothingToRecord,
    State,
    StoreError,
    StoreUnavailable,
)
from caps.store import sharedlayout as layout
from caps.store.group import WriterThread
from caps.store.redis import check_durable, wait_durable
from caps.store.redisconnect import connect, opening, shown
from caps.store.redislayout import LAYOUT_KEY

# Seconds between tries after a failed round trip.
RETRY_DELAY = 1.0
# Seconds between heartbeats (each also gives back the messages of brokers
# whose heartbeat lapsed, and moves expired messages to the dead letters).
BEAT = 1.0
# Expired messages one heartbeat moves at most.
EXPIRE_BUDGET = 1000


class SharedStore(WriterThread, NothingToRecord):
    """
    One broker's link to the Redis it shares with others.

    @ivar broker_id: this broker's name in Redis (also the prefix of the
        messageIds it makes).
    @ivar version: the subscriptions version of the state L{load} read.
    @ivar available: False after a failed round trip, until one succeeds.
    """

    log = Logger()
    # The broker keeps no queue's messages beyond those it claimed.
    window = None

    def __init__(
        self, url, clock, client, broker_id, durable=None, runner=None, listen=True
    ):
        super().__init__(clock, runner)
        self.name = shown(url)
        self.broker_id = broker_id
        self.durable, self.replicas = durable or (None, 0)
        self.available = True
        self.version = 0
        self.max_deliveries = 20
        self._url = url
        self._client = client
        self._shas = {
            name: client.script_load(source) for name, source in layout.SCRIPTS.items()
        }
        self._call = None
        # For each script call of the round trip under way, the indexes of
        # the ops in it (see _merge)
        self._merged = []
        self._closed = False
        # Leaving: nothing more goes to Redis after the LEAVE call
        self._closing = False
        self._broker = None
        # Times Redis says this broker was given up for dead, as last heard
        self._lapses = 0
        self._listen = listen
        self._events = None
        # Milliseconds this broker's heartbeat lasts in Redis.
        self.alive = layout.ALIVE_MS
        self._beating = task.LoopingCall(self._beat)
        self._beating.clock = clock
        self._description = json.dumps({"pid": os.getpid(), "started": time.time()})

    @classmethod
    def open(cls, url, clock, durable=False, runner=None, listen=True):
        """
        Join the brokers sharing the Redis database at C{url}.

        @param runner: runs a function on the writer thread (tests give one
            that runs it at once).
        @param listen: hear the other brokers (tests hand the broker what
            they hear themselves).

        @raise StoreError: with a one-line reason, the password left out.
        """
        name = shown(url)
        client = connect(url)
        with opening(client, name):
            _check_layout(client, name)
            how = check_durable(client, name) if durable else None
            store = cls(url, clock, client, uuid.uuid4().hex[:12], how, runner, listen)
            # Alive before claiming anything: a broker with claims and no
            # heartbeat is given up for dead by the others.
            store._lapses = store._run_now("beat", *store._beat_args())[3]
        return store

    def load(self):
        """
        The subscriptions every broker routes by, no messages: a broker
        claims those as its consumers want them.
        """
        state = State()
        self.version, metas = subscriptions_of(self._run_now("subscriptions"))
        for qid, (client_id, event, subscribed, flt, max_length) in metas.items():
            if not subscribed:
                # Routed to by address only: the broker need not know it.
                continue
            state.queues[client_id, event] = Queue(
                client_id,
                event,
                qid,
                filter=flt,
                subscribed=subscribed,
                max_length=max_length,
            )
        return state

    def attach(self, broker):
        """
        Tell C{broker} what the other brokers do (C{broker.heard(kind,
        words)}, on the reactor thread), and start the heartbeat.
        """
        self.max_deliveries = broker.max_deliveries
        self._broker = broker
        if self._listen:
            self._events = _Events(self._url, self.clock, broker.heard)
            self._events.start()
        self._beating.start(BEAT, now=False)

    @property
    def leaving(self):
        """
        Whether the broker is closing: after its LEAVE nothing more goes
        to Redis.
        """
        return self._closing

    # Calls

    def call(self, name, *args, retry=False, notify=()):
        """
        Run script C{name} with C{args} in the next round trip.

        @param retry: it is safe to run twice: after a failed round trip it
            is tried again (its L{Deferred} waits), else it fails.
        @param notify: qids to announce as holding ready messages once it
            has run (a publish's).
        @return: a L{Deferred} firing with the script's answer.
        """
        if self._closing:
            return defer.fail(StoreUnavailable(UNAVAILABLE))
        d = defer.Deferred()
        self._ops.append((name, args, d, retry, notify))
        if self._call is None and self._writing is None:
            self._call = self.clock.callLater(0, self._flush)
        return d

    def _run_now(self, name, *args):
        """
        Run a script at once, on the caller's thread (only while starting).
        """
        return self._client.evalsha(self._shas[name], 0, *args)

    def _flush(self):
        self._call = None
        if self._writing is not None or not self._ops:
            return
        self._writing = (self._ops, self._waiters)
        self._ops, self._waiters = [], []
        ops = self._writing[0]
        notify = {qid for op in ops for qid in op[4]}
        calls, self._merged = _merge(ops)
        d = self._run(
            _round_trip,
            self._client,
            self._shas,
            calls,
            notify,
            self.durable,
            self.replicas,
        )
        d.addBoth(self._done)

    def _done(self, result):
        ops, waiters = self._writing
        self._writing = None
        if isinstance(result, Failure):
            if self.available:
                self.log.failure(
                    "cannot reach the shared store {store}; retrying every {delay} s",
                    result,
                    store=self.name,
                    delay=RETRY_DELAY,
                )
            self.available = False
            again = []
            for op in ops:
                if op[3]:
                    again.append(op)
                else:
                    op[2].errback(StoreUnavailable(UNAVAILABLE))
            self._ops = again + self._ops
            self._waiters = waiters + self._waiters
            if self._ops and not self._closed and self._call is None:
                self._call = self.clock.callLater(RETRY_DELAY, self._flush)
            return None
        if not self.available:
            self.log.info("shared store {store} is reachable again", store=self.name)
            self.available = True
        seconds, answers = result
        answers = _split(answers, self._merged, len(ops))
        for op, answer in zip(ops, answers, strict=True):
            if isinstance(answer, Exception):
                op[2].errback(answer)
            else:
                op[2].callback(answer)
        self._observe(seconds)
        for waiter in waiters:
            waiter.callback(None)
        if self._ops and self._call is None:
            self._flush()
        return None

    # The heartbeat

    def _beat_args(self):
        return (
            self.broker_id,
            self._description,
            self.clock.seconds(),
            self.max_deliveries,
            EXPIRE_BUDGET,
            self.alive,
        )

    def _beat(self):
        d = self.call("beat", *self._beat_args())
        d.addCallbacks(self._beaten, self._beat_failed)

    def _beaten(self, answer):
        reaped, returned, _, lapses = answer[:4]
        if lapses > self._lapses:
            # Given up for dead since the last beat this broker heard (the
            # count, not a flag: the answer of the beat that first saw it
            # may have been lost).
            self._lapses = lapses
            if self._broker is not None:
                self._broker.lapsed()
        if reaped:
            self.log.warn(
                "{brokers} broker(s) sharing {store} stopped beating: "
                "{count} message(s) they held are ready again",
                brokers=reaped,
                store=self.name,
                count=returned,
            )

    def _beat_failed(self, failure):
        # Logged by the failed round trip; beaten again in a second.
        failure.trap(StoreUnavailable)

    # Closing

    def close(self):
        """
        Give back every message this broker holds, stop beating and
        listening, and release the connection.
        """
        return defer.ensureDeferred(self._close())

    async def _close(self):
        if self._beating.running:
            self._beating.stop()
        leaving = self.call("leave", self.broker_id)
        # What is asked after this would run after LEAVE: a claim then
        # would hold messages for a broker nobody gives back for.
        self._closing = True
        try:
            await leaving
        except Exception as e:
            self.log.warn(
                "{store}: could not give back the messages this broker "
                "held ({error}); the other brokers take them back once its "
                "heartbeat lapses",
                store=self.name,
                error=str(e),
            )
        self._closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._events is not None:
            await self._run(self._events.stop)
        if self._pool is not None:
            self._pool.stop()
        self._client.close()


# Calls of these scripts in one round trip go as one call: script name ->
# how many leading arguments they share (the rest, one item's, are
# appended), and how many of those must be equal to merge (a give-back's
# time may differ by a little: the first one's is used).
_MERGED = {"ack": (1, 1), "give": (3, 1), "publish": (4, 1)}
# Calls nothing is merged across: a publish asked after a purge must not
# run before it (and be purged), nor one after a subscription's save.
_BARRIERS = {"purge", "delete", "requeue", "unclaim", "leave", "save", "subscriptions"}
# Merged calls that answer one item for each op in them.
_ITEMIZED = {"ack", "publish"}


def _merge(ops):
    """
    The script calls for C{ops}, those of L{_MERGED} merged into the first
    call of their kind since the last of L{_BARRIERS}; and, for each call,
    its script's name and the indexes of the ops in it.
    """
    calls = []
    members = []
    first = {}
    for i, (name, args, _, _, _) in enumerate(ops):
        if name in _BARRIERS:
            # Nothing asked after it may run before it.
            first.clear()
        shared = _MERGED.get(name)
        if shared is not None:
            head, key = shared
            at = first.get((name, *args[:key]))
            if at is not None:
                calls[at][1].extend(args[head:])
                members[at][1].append(i)
                continue
            first[name, *args[:key]] = len(calls)
            args = list(args)
        calls.append((name, args))
        members.append((name, [i]))
    return calls, members


def _split(answers, members, count):
    """
    Each op's answer from its call's: an acknowledgement or a publish gets
    its own (their scripts answer one for each message); every other op
    gets its call's answer.
    """
    split = [None] * count
    for answer, (name, indexes) in zip(answers, members, strict=True):
        if name in _ITEMIZED and not isinstance(answer, Exception):
            for i, each in zip(indexes, answer, strict=True):
                split[i] = each
        else:
            for i in indexes:
                split[i] = answer
    return split


def _round_trip(client, shas, ops, notify, durable, replicas):
    """
    Run script calls in one pipeline (on the writer thread) and announce
    the queues given in C{notify}; with C{durable}, wait for the sync and a
    replica.

    @return: the seconds it took, and each call's answer (an exception for
        one that failed).
    """
    from redis.exceptions import NoScriptError

    started = time.perf_counter()
    answers = _pipeline(client, shas, ops, notify)
    missing = [
        i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)
    ]
    if missing:
        # Redis restarted and forgot the scripts: load them, run those again.
        for name in {ops[i][0] for i in missing}:
            client.script_load(layout.SCRIPTS[name])
        again = _pipeline(client, shas, [ops[i] for i in missing], notify)
        for i, answer in zip(missing, again, strict=True):
            answers[i] = answer
    if durable is not None:
        wait_durable(client, durable, replicas > 0)
    return time.perf_counter() - started, answers


def _pipeline(client, shas, ops, notify):
    pipe = client.pipeline(transaction=False)
    for name, args in ops:
        pipe.evalsha(shas[name], 0, *args)
    if notify:
        pipe.publish(layout.CHANNEL, "ready " + " ".join(sorted(notify)))
    answers = pipe.execute(raise_on_error=False)
    return answers[: len(ops)]


def subscriptions_of(answer):
    """
    The subscriptions version and every queue's record, from the
    C{subscriptions} script's answer.
    """
    metas = {}
    for i in range(1, len(answer), 2):
        qid = answer[i].decode("ascii")
        metas[qid] = json.loads(answer[i + 1])
    return int(answer[0]), metas


def _check_layout(client, name):
    found = client.get(LAYOUT_KEY)
    if found is None:
        if client.dbsize():
            raise StoreError(
                f"caps-broker: {name} holds keys that are not a CAPS store; "
                f"give the brokers a database of their own"
            )
        client.set(LAYOUT_KEY, layout.LAYOUT)
    elif found.decode("ascii", "replace") != layout.LAYOUT:
        raise StoreError(
            f"caps-broker: {name} is the store of one broker (without "
            f"--shared); give the shared brokers another database"
        )


class _Events(threading.Thread):
    """
    Listens on the brokers' channel and hands each message to C{heard} on
    the reactor thread; C{heard("resync", [])} each time it (re)subscribes,
    since it may have missed messages while it was cut off.
    """

    log = Logger()

    def __init__(self, url, reactor, heard):
        super().__init__(name="caps-shared-events", daemon=True)
        self._url = url
        self._reactor = reactor
        self._heard = heard
        self._stopping = threading.Event()

    def _tell(self, kind, words):
        self._reactor.callFromThread(self._heard, kind, words)

    def run(self):
        while not self._stopping.is_set():
            client = None
            try:
                client = connect(self._url)
                events = client.pubsub()
                events.subscribe(layout.CHANNEL)
                while not self._stopping.is_set():
                    message = events.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._tell("resync", [])
                    elif message["type"] == "message":
                        kind, *words = message["data"].decode("utf-8").split(" ")
                        self._tell(kind, words)
            except Exception as e:
                if not self._stopping.is_set():
                    self.log.warn(
                        "lost the shared store's events ({error}); listening "
                        "again in {delay} s",
                        error=str(e),
                        delay=RETRY_DELAY,
                    )
                    self._stopping.wait(RETRY_DELAY)
            finally:
                if client is not None:
                    client.close()

    def stop(self):
        self._stopping.set()
        self.join(5.0)
