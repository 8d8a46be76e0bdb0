"""
A model-based test of the broker: hypothesis drives it with random
sequences of publishes, subscribes, unsubscribes, getAlls, acknowledgements,
nacks, requeues, pauses, disconnects, clock advances and restarts, on each
store, and compares it with a small reference model after every step.

What the model checks (after every step, or at the moment named):

- Nothing lost, nothing extra.  Each published, non-duplicate message has
  one copy per queue it was routed to (the clientId it was addressed to,
  and every subscribed queue of its event).  A copy is acknowledged,
  deleted with its queue, or in exactly one of its queue and that queue's
  dead letters, with its messageId, ttl and delivery count; no queue holds
  anything else, and only the expected queues exist.
- In flight to one connection at a time.  Every entry's owner is a live
  session holding it; no two sessions hold the same copy; what the broker
  has in flight to a connection is exactly what that connection received
  and has not acknowledged, nacked or lost to an ack timeout; nothing goes
  back before its ack timeout, nor stays in flight after it (but see
  KNOWN_BUGS); a subscribe that changes ackTimeout shortens, or with 0
  ends, the deadlines of what the consumer holds.
- Prefetch.  When a message is sent through a subscription, that
  subscription's messages in flight, this one included, are at most its
  prefetch; nothing is sent to a paused or closed connection, or on a queue
  the connection neither consumes nor asked a getAll of.
- FIFO.  Every delivery is the oldest message of its queue that is neither
  in flight nor delayed by a nack; and, black box, among the first
  deliveries (deliveries == 1) from a live queue the publish order
  increases.  requeue resets a dead letter's count to 0, so the first
  delivery after a requeue may come after newer messages: that one is
  exempt.  Messages reach the dead letters in the order they die, so first
  deliveries from there are not held to publish order.
- Delivery counts go up by one each time, across restarts, and requeue
  resets them; a message past its ttl is never sent from a live queue; a
  message nacked with a delay is not sent before the delay is over, and
  is ready again when it is.
- Dead letters.  A copy is in the dead letters only with reason
  max-deliveries (after at least max_deliveries deliveries) or expired
  (its ttl passed, no later than when it died); one that is given back
  (nack, ack timeout, disconnect, unsubscribe) dies at once if either
  holds, and otherwise stays in its queue; a restart dead-letters what
  was in flight with max_deliveries deliveries; a copy not in flight never
  stays in a live queue with max_deliveries deliveries; dead letters leave
  only by acknowledgement (on the dead-letter queue, or late, on the live
  one), deletion or requeue.  A live queue holding messages with a ttl is
  watched by the expiry sweep.
- Duplicates.  A client-given messageId still held in a queue, or
  accepted less than the dedupe window ago, is a duplicate and stores
  nothing; the window is not extended by duplicates.
- getAll sends only messages published before it was asked, and answers
  once, in order, with how many it sent, when none of those is ready.
- Nothing fails inside a timer: no failure is logged.
"""

import json
import os
import tempfile
from unittest import skipIf

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from caps.broker import Broker
from caps.frames import DEAD_SUFFIX, encode_json
from caps.store.memory import MemoryStore
from caps.store.redis import LOCK_KEY, RedisStore
from caps.store.sqlite import SQLiteStore

from . import redisserver
from .helpers import RecordingConnection
from .test_store import synchronous

CLIENTS = ("acme", "bolt")
EVENTS = ("pickup", "drop")
LIVE_KEYS = tuple((c, e) for c in CLIENTS for e in EVENTS)
DEAD_KEYS = tuple((c, e + DEAD_SUFFIX) for c, e in LIVE_KEYS)
# Live queues twice: most of the action is there.
QUEUE_KEYS = LIVE_KEYS + LIVE_KEYS + DEAD_KEYS
CLIENT_IDS = ("m0", "m1", "m2")
SLOTS = 3
MAX_DELIVERIES = 3
ACK_TIMEOUT = 10
DEDUPE_WINDOW = 60.0
START = 1_700_000_000

# Broker bugs this test found and that are not fixed yet.  While the set
# holds a name, the machine avoids that bug; empty it to see it found.  It
# found two, both fixed: a restart with the memory store dead-lettered
# messages to consumers of the stopped broker, and Deadlines.add called
# while deadlines were being handled postponed an earlier one.
KNOWN_BUGS = set()

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    database=None,
)
# Redis is slower to talk to: fewer examples.
REDIS_SETTINGS = settings(SETTINGS, max_examples=50)


def live_key(key):
    """
    The live queue a queue key belongs to: itself, or the queue whose dead
    letters it holds.
    """
    client_id, event = key
    if event.endswith(DEAD_SUFFIX):
        return client_id, event[: -len(DEAD_SUFFIX)]
    return key


def dead_key(key):
    return key[0], key[1] + DEAD_SUFFIX


@attrs.define(eq=False)
class Copy:
    """
    One published message in one queue (its live queue or, once dead, that
    queue's dead letters).

    @ivar dead: C{(reason, time)} while in the dead letters.
    @ivar deliveries: sends seen since publish, or since the last requeue.
    @ivar requeued: moved back by requeue and not sent since.
    @ivar not_before: nacked with a delay: not sent before then.
    """

    n: int
    message_id: str | None
    key: tuple
    expires: float | None
    dead: tuple | None = None
    deliveries: int = 0
    requeued: bool = False
    not_before: float = 0.0

    @property
    def where(self):
        return dead_key(self.key) if self.dead else self.key


@attrs.define(eq=False)
class Holding:
    """
    A copy in flight to a connection, as the model saw it sent.

    @ivar via: the subscription's queue key, or L{None} for a getAll.
    @ivar deadline: when its ack timeout runs out, or L{None}.
    """

    via: tuple | None
    deliveries: int
    deadline: float | None


@attrs.define(eq=False)
class Sub:
    prefetch: int
    ack_timeout: float


@attrs.define(eq=False)
class Catchup:
    """
    A getAll not answered yet.

    @ivar until: it covers the messages numbered below this.
    """

    key: tuple
    queue: object
    until: int
    count: int = 0
    dropped: bool = False


@attrs.define(eq=False)
class Slot:
    """
    A place for one client connection at a time.

    @ivar room: deliveries its send buffer takes before it fills up (the
        connection is then paused, as its transport would), or L{None}.
    @ivar holdings: (queue key, n) -> L{Holding}.
    """

    conn: object = None
    paused: bool = False
    room: int | None = None
    subs: dict = attrs.Factory(dict)
    holdings: dict = attrs.Factory(dict)
    catchups: list = attrs.Factory(list)


class ModelConnection(RecordingConnection):
    """
    A recording connection that also shows the model each delivery as it
    happens.
    """

    def __init__(self, name, observe):
        super().__init__(name)
        self._observe = observe

    def deliver(self, entry):
        super().deliver(entry)
        self._observe(self, entry, self.deliveries[-1])


class _BrokerModel(RuleBasedStateMachine):
    """
    The broker and its reference model.  Problems seen inside broker calls
    (deliveries, getAll answers, logged failures) are collected and
    reported by the next check, since an exception raised there could be
    swallowed by a timer or a Deferred.

    @cvar same_objects: a restart finds the same queue objects (the memory
        store).
    """

    same_objects = False

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.clock.advance(START)
        self.store = self.open_store()
        self.broker = self.make_broker()
        self.problems = []
        # (live key, n) -> Copy, for every copy not acknowledged or deleted
        self.copies = {}
        # client-given messageId -> end of its dedupe window
        self.remembered = {}
        self.subscribed = set()
        self.exists = set()
        self.slots = [Slot() for _ in range(SLOTS)]
        self.generation = 0
        # live key -> highest n sent with deliveries == 1
        self.last_first = {}
        self.next_n = 0
        # (queue key, messageId, n) ever delivered: stale acknowledgements
        self.delivered = []
        # (live key, n) -> ("live" or "dead", reason or None): where a copy
        # given back during this step must be at its end
        self.must = {}
        # (queue key, len) answered by subscribe in this step
        self.answered_len = None
        self.last_check = self.clock.seconds()
        globalLogPublisher.addObserver(self.logged)

    def logged(self, event):
        failure = event.get("log_failure")
        if failure is not None:
            self.problem(f"logged failure: {failure.getTraceback()}")

    def make_broker(self):
        return Broker(
            self.clock,
            store=self.store,
            ack_timeout=ACK_TIMEOUT,
            max_deliveries=MAX_DELIVERIES,
            dedupe_window=DEDUPE_WINDOW,
        )

    def teardown(self):
        globalLogPublisher.removeObserver(self.logged)
        self.broker.stop()
        self.close_store()
        assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()

    def problem(self, text):
        self.problems.append(f"t={self.clock.seconds() - START}: {text}")

    def expect(self, actual, expected, what):
        if actual != expected:
            self.problem(f"{what}: got {actual!r}, expected {expected!r}")

    # Looking things up

    def by_id(self, message_id):
        for copy in self.copies.values():
            if copy.message_id == message_id:
                return copy.n
        return None

    def connected(self):
        return [i for i, slot in enumerate(self.slots) if slot.conn is not None]

    def slot_of(self, conn):
        for slot in self.slots:
            if slot.conn is conn:
                return slot
        return None

    def all_holdings(self):
        return [
            (i, hkey)
            for i, slot in enumerate(self.slots)
            for hkey in slot.holdings
            if slot.conn is not None
        ]

    # What the broker tells us as it happens

    def observe(self, conn, entry, record):
        """
        A delivery: check it is allowed, and note it.
        """
        now = self.clock.seconds()
        key = (record["clientId"], record["event"])
        n = record["payload"]["n"]
        copy = self.copies.get((live_key(key), n))
        what = f"delivery of n={n} from {key} to {conn.name}"
        slot = self.slot_of(conn)
        if slot is None or slot.paused:
            self.problem(f"{what}: the connection is closed or paused")
            return
        if copy is None:
            self.problem(f"{what}: no such message in the model")
            return
        if copy.message_id is None:
            copy.message_id = record["messageId"]
        self.expect(record["messageId"], copy.message_id, f"{what}: messageId")
        self.expect(record["deliveries"], copy.deliveries + 1, f"{what}: deliveries")
        if key == copy.key:
            if copy.expires is not None and copy.expires <= now:
                self.problem(f"{what}: sent after its ttl ran out")
            if record["deliveries"] == 1:
                last = self.last_first.get(key, -1)
                if not copy.requeued and n <= last:
                    self.problem(f"{what}: first sent after newer n={last}")
                self.last_first[key] = max(last, n)
        if now < copy.not_before:
            self.problem(f"{what}: sent before its nack delay ran out")
        for other in entry.queue.entries():
            if (
                other is not entry
                and other.owner is None
                and not other.delayed
                and other.message.seq < entry.message.seq
            ):
                self.problem(f"{what}: an older message of its queue was ready")
                break
        copy.deliveries = record["deliveries"]
        copy.requeued = False
        session = self.broker._sessions.get(conn)
        if entry.owner is not session or session is None:
            self.problem(f"{what}: the entry's owner is not the session")
        consumer = entry.consumer
        if consumer is None:
            timeout = ACK_TIMEOUT
            head = slot.catchups[0] if slot.catchups else None
            if head is None or head.queue is not entry.queue or n >= head.until:
                self.problem(f"{what}: no getAll asked for it")
            else:
                head.count += 1
        else:
            sub = slot.subs.get(key)
            timeout = sub.ack_timeout if sub else 0
            if sub is None or consumer.queue is not entry.queue:
                self.problem(f"{what}: not subscribed to that queue")
            else:
                held = sum(1 for e in session.in_flight if e.consumer is consumer)
                if held > sub.prefetch:
                    self.problem(f"{what}: {held} in flight, prefetch {sub.prefetch}")
        slot.holdings[key, n] = Holding(
            key if consumer is not None else None,
            record["deliveries"],
            now + timeout if timeout > 0 else None,
        )
        stale = (key, copy.message_id, n)
        if stale not in self.delivered:
            self.delivered = [*self.delivered[-29:], stale]
        if slot.room is not None:
            slot.room -= 1
            if not slot.room:
                # Its send buffer is full: paused in the middle of sending.
                slot.room = None
                slot.paused = True
                self.broker.pause(conn)

    def caught_up(self, result, slot, catchup):
        """
        A getAll answered.
        """
        what = f"getAll of {catchup.key}"
        if catchup.dropped:
            self.problem(f"{what}: answered after its connection went away")
        elif not slot.catchups or slot.catchups[0] is not catchup:
            self.problem(f"{what}: answered out of order")
        else:
            slot.catchups.pop(0)
        client_id, event = catchup.key
        self.expect(
            result,
            {"clientId": client_id, "event": event, "count": catchup.count},
            what,
        )
        for entry in catchup.queue.entries():
            n = json.loads(entry.message.payload)["n"]
            if entry.owner is None and not entry.delayed and n < catchup.until:
                self.problem(f"{what}: answered with n={n} still ready")
                break

    def given_back(self, hkey, holding, delay=0):
        """
        A copy in flight comes back (nack, timeout, disconnect, unsubscribe):
        note where it must be at the end of the step.
        """
        key, n = hkey
        copy = self.copies[live_key(key), n]
        now = self.clock.seconds()
        if key != copy.key:
            where = ("dead", None)
        elif holding.deliveries >= MAX_DELIVERIES:
            where = ("dead", "max-deliveries")
        elif copy.expires is not None and copy.expires <= now:
            where = ("dead", "expired")
        else:
            where = ("live", None)
        self.must[copy.key, n] = where
        if delay and where[1] is None:
            copy.not_before = now + delay
        return where

    def forget_copy(self, copy):
        """
        A copy was acknowledged or deleted with its queue.
        """
        del self.copies[copy.key, copy.n]
        for slot in self.slots:
            slot.holdings.pop((copy.where, copy.n), None)

    # Rules: publishing

    def _publish(self, client_id, event, message_id=None, ttl=None):
        now = self.clock.seconds()
        n = self.next_n
        self.next_n += 1
        payload = {"n": n}
        duplicate = message_id is not None and (
            self.by_id(message_id) is not None
            or self.remembered.get(message_id, 0) > now
        )
        routed = {(client_id, event)}
        routed.update(k for k in self.subscribed if k[1] == event)
        expires = now + ttl if ttl is not None else None
        if not duplicate:
            # In the model before the call: it may be sent at once.  A
            # broker-given id is learnt from the answer (or the delivery).
            for key in routed:
                self.copies[key, n] = Copy(n, message_id, key, expires)
        result = self.broker.publish(
            event, payload, encode_json(payload), (client_id,), message_id, ttl
        )
        if duplicate:
            self.expect(
                result,
                {"messageId": message_id, "queues": 0, "duplicate": True},
                f"publish of duplicate {message_id}",
            )
            return
        self.expect(
            result,
            {"messageId": result["messageId"], "queues": len(routed)},
            f"publish of n={n}",
        )
        if message_id is not None:
            self.expect(result["messageId"], message_id, f"publish of n={n}: id")
        message_id = result["messageId"]
        if message_id in CLIENT_IDS:
            self.remembered[message_id] = now + DEDUPE_WINDOW
        elif self.by_id(message_id) not in (None, n):
            self.problem(f"publish of n={n}: messageId {message_id} taken")
        for key in routed:
            self.copies[key, n].message_id = message_id
            self.exists.add(key)

    @rule()
    def publish_next(self):
        """
        Publish to each queue in turn.  (Hypothesis favours the rules with
        the fewest arguments: let this one be the most frequent.)
        """
        self._publish(*LIVE_KEYS[self.next_n % len(LIVE_KEYS)])

    @rule(client_id=st.sampled_from(CLIENTS), event=st.sampled_from(EVENTS))
    def publish(self, client_id, event):
        self._publish(client_id, event)

    @rule(
        client_id=st.sampled_from(CLIENTS),
        event=st.sampled_from(EVENTS),
        message_id=st.sampled_from(CLIENT_IDS),
    )
    def publish_with_id(self, client_id, event, message_id):
        self._publish(client_id, event, message_id=message_id)

    @rule(
        client_id=st.sampled_from(CLIENTS),
        event=st.sampled_from(EVENTS),
        ttl=st.sampled_from([5, 20, 60]),
        message_id=st.none() | st.sampled_from(CLIENT_IDS),
    )
    def publish_with_ttl(self, client_id, event, ttl, message_id):
        self._publish(client_id, event, message_id=message_id, ttl=ttl)

    # Rules: connections

    def _connect(self, i):
        self.generation += 1
        conn = ModelConnection(f"c{i}.{self.generation}", self.observe)
        self.slots[i] = Slot(conn)
        self.broker.connect(conn)

    @initialize(data=st.data())
    def connect_all(self, data):
        """
        Every connection starts consuming a live queue, or polls.
        """
        for i in range(SLOTS):
            self._connect(i)
            key = data.draw(st.sampled_from([*LIVE_KEYS, None]), label="queue")
            if key is not None:
                self._subscribe(
                    i,
                    key,
                    data.draw(st.integers(1, 5), label="prefetch"),
                    data.draw(st.sampled_from([0, 2, 5]), label="ackTimeout"),
                )

    def _reconnect(self, i, subs):
        """
        Connect again and subscribe again, as CapsClient does.
        """
        self._connect(i)
        for key, sub in subs.items():
            self._subscribe(i, key, sub.prefetch, sub.ack_timeout)

    @precondition(lambda self: len(self.connected()) < SLOTS)
    @rule(data=st.data())
    def connect(self, data):
        free = [i for i, slot in enumerate(self.slots) if slot.conn is None]
        self._connect(data.draw(st.sampled_from(free), label="slot"))

    def _drop_slot(self, i):
        slot = self.slots[i]
        for catchup in slot.catchups:
            catchup.dropped = True
        self.slots[i] = Slot()

    @precondition(lambda self: self.connected())
    @rule(data=st.data(), reconnect=st.booleans())
    def disconnect(self, data, reconnect):
        i = data.draw(st.sampled_from(self.connected()), label="slot")
        slot = self.slots[i]
        for hkey, holding in slot.holdings.items():
            self.given_back(hkey, holding)
        self._drop_slot(i)
        self.broker.disconnect(slot.conn)
        if reconnect:
            self._reconnect(i, slot.subs)

    def running(self):
        return [i for i in self.connected() if not self.slots[i].paused]

    def paused(self):
        return [i for i in self.connected() if self.slots[i].paused]

    @precondition(running)
    @rule(data=st.data(), room=st.sampled_from([0, 1, 3]))
    def pause(self, data, room):
        """
        Pause a connection now, or once its send buffer has taken C{room}
        more deliveries.
        """
        slot = self.slots[data.draw(st.sampled_from(self.running()), label="slot")]
        if room:
            slot.room = room
        else:
            slot.room = None
            slot.paused = True
            self.broker.pause(slot.conn)

    @precondition(paused)
    @rule(data=st.data())
    def resume(self, data):
        """
        A paused connection's send buffer drained.
        """
        slot = self.slots[data.draw(st.sampled_from(self.paused()), label="slot")]
        slot.paused = False
        self.broker.resume(slot.conn)

    # Rules: consuming

    @precondition(lambda self: self.connected())
    @rule(
        data=st.data(),
        prefetch=st.integers(1, 5),
        ack_timeout=st.sampled_from([0, 2, 5]),
    )
    def subscribe(self, data, prefetch, ack_timeout):
        """
        Subscribe to a queue, or again (new prefetch and ackTimeout) to one
        the connection consumes.
        """
        i = data.draw(st.sampled_from(self.connected()), label="slot")
        keys = [*self.slots[i].subs, *QUEUE_KEYS]
        key = data.draw(st.sampled_from(keys), label="queue")
        self._subscribe(i, key, prefetch, ack_timeout)

    def _subscribe(self, i, key, prefetch, ack_timeout):
        slot = self.slots[i]
        sub = slot.subs.get(key)
        if sub is None:
            slot.subs[key] = Sub(prefetch, ack_timeout)
        else:
            if ack_timeout != sub.ack_timeout:
                # What it holds gets no more time than the new timeout;
                # what it got while it had none gets the new one.
                latest = self.clock.seconds() + ack_timeout
                for holding in slot.holdings.values():
                    if holding.via != key:
                        continue
                    if not ack_timeout:
                        holding.deadline = None
                    elif holding.deadline is None:
                        holding.deadline = latest
                    else:
                        holding.deadline = min(holding.deadline, latest)
            sub.prefetch, sub.ack_timeout = prefetch, ack_timeout
        result = self.broker.subscribe(
            slot.conn, *key, prefetch=prefetch, ack_timeout=ack_timeout
        )
        self.subscribed.add(key)
        self.exists.add(key)
        self.expect(
            result,
            {"clientId": key[0], "event": key[1], "messages": result["messages"]},
            f"subscribe to {key}",
        )
        self.answered_len = (key, result["messages"])

    @precondition(lambda self: self.connected())
    @rule(
        data=st.data(),
        key=st.sampled_from(QUEUE_KEYS),
        delete=st.integers(0, 3).map(lambda x: x == 3),
    )
    def unsubscribe(self, data, key, delete):
        i = data.draw(st.sampled_from(self.connected()), label="slot")
        slot = self.slots[i]
        existed = key in self.exists
        # Noted before the call: what comes back may be sent on at once.
        if existed and not delete:
            slot.subs.pop(key, None)
            for hkey in [h for h in slot.holdings if h[0] == key]:
                self.given_back(hkey, slot.holdings.pop(hkey))
        result = self.broker.unsubscribe(slot.conn, *key, delete=delete)
        self.expect(
            result,
            {"clientId": key[0], "event": key[1], "deleted": delete and existed},
            f"unsubscribe from {key}",
        )
        if existed and delete:
            for copy in [c for c in self.copies.values() if c.where == key]:
                self.forget_copy(copy)
            for other in self.slots:
                other.subs.pop(key, None)
            self.subscribed.discard(key)
            self.exists.discard(key)

    @precondition(lambda self: self.connected())
    @rule(data=st.data(), key=st.sampled_from(QUEUE_KEYS))
    def get_all(self, data, key):
        slot = self.slots[data.draw(st.sampled_from(self.connected()), label="slot")]
        if key not in self.exists:
            d = self.broker.get_all(slot.conn, *key)
            answers = []
            d.addCallback(answers.append)
            self.expect(
                answers,
                [{"clientId": key[0], "event": key[1], "count": 0}],
                f"getAll of missing {key}",
            )
            return
        catchup = Catchup(key, self.broker.queue(*key), self.next_n)
        slot.catchups.append(catchup)
        d = self.broker.get_all(slot.conn, *key)
        d.addCallback(self.caught_up, slot, catchup)

    # Rules: acknowledging and giving back

    def _received(self, key, message_id):
        n = self.by_id(message_id)
        copy = self.copies.get((live_key(key), n))
        # On a live queue, a late acknowledgement reaches the dead letters.
        expected = copy is not None and key in (copy.where, copy.key)
        result = self.broker.received(*key, message_id)
        self.expect(
            result,
            {
                "clientId": key[0],
                "event": key[1],
                "messageId": message_id,
                "deleted": expected,
            },
            f"received {message_id} of {key}",
        )
        if expected:
            self.forget_copy(copy)

    @precondition(lambda self: self.all_holdings())
    @rule(data=st.data())
    def received_held(self, data):
        i, (key, n) = data.draw(st.sampled_from(self.all_holdings()), label="held")
        self._received(key, self.copies[live_key(key), n].message_id)

    @rule(data=st.data())
    def received_other(self, data):
        """
        Acknowledge something received before (perhaps deleted since,
        perhaps not in flight any more), or a messageId never used.
        """
        choices = [*self.delivered, (QUEUE_KEYS[-1], "ghost", None)]
        key, message_id, n = data.draw(st.sampled_from(choices), label="old")
        # Acknowledge only what was received: not a newer message that
        # reuses the id.
        if self.by_id(message_id) in (None, n):
            self._received(key, message_id)

    @precondition(lambda self: self.all_holdings())
    @rule(data=st.data(), delay=st.sampled_from([0, 0, 2, 5]))
    def nack_held(self, data, delay):
        i, (key, n) = data.draw(st.sampled_from(self.all_holdings()), label="held")
        self._nack(i, key, self.copies[live_key(key), n].message_id, delay)

    @precondition(lambda self: self.connected())
    @rule(data=st.data(), delay=st.sampled_from([0, 2]))
    def nack_other(self, data, delay):
        """
        Nack what another connection holds, or held once, or a messageId
        never used: only the holder's nack counts.
        """
        i = data.draw(st.sampled_from(self.connected()), label="slot")
        targets = [
            (k, self.copies[live_key(k), n].message_id)
            for _, (k, n) in self.all_holdings()
        ]
        targets += [(k, m) for k, m, _ in self.delivered]
        targets.append((LIVE_KEYS[0], "ghost"))
        key, message_id = data.draw(st.sampled_from(targets), label="target")
        self._nack(i, key, message_id, delay)

    def _nack(self, i, key, message_id, delay):
        slot = self.slots[i]
        n = self.by_id(message_id)
        # Noted before the call: it may be sent again at once.
        holding = slot.holdings.pop((key, n), None)
        if holding is not None:
            self.given_back((key, n), holding, delay)
        result = self.broker.nack(slot.conn, *key, message_id, delay)
        self.expect(
            result,
            {
                "clientId": key[0],
                "event": key[1],
                "messageId": message_id,
                "nacked": holding is not None,
            },
            f"nack of {message_id} from {key}",
        )

    @precondition(lambda self: any(k in self.exists for k in DEAD_KEYS))
    @rule(data=st.data(), key=st.sampled_from(LIVE_KEYS))
    def requeue(self, data, key):
        dead = [c for c in self.copies.values() if c.key == key and c.dead]
        choices = [None, "ghost"] + [c.message_id for c in dead]
        message_id = data.draw(st.sampled_from(choices), label="messageId")
        held = {hkey for slot in self.slots for hkey in slot.holdings}
        moving = [
            c
            for c in dead
            if message_id in (None, c.message_id) and (c.where, c.n) not in held
        ]
        for copy in moving:
            copy.dead = None
            copy.deliveries = 0
            copy.not_before = 0.0
            copy.requeued = True
        result = self.broker.requeue(*key, message_id)
        self.expect(
            result,
            {"clientId": key[0], "event": key[1], "requeued": len(moving)},
            f"requeue of {message_id} in {key}",
        )
        if dead_key(key) in self.exists:
            self.exists.add(key)

    # Rules: time and restarts

    @rule(half_seconds=st.integers(1, 8) | st.integers(1, 80))
    def advance(self, half_seconds):
        """
        Time passes: 0.5 to 40 s, often no more than 4 s, so that checks
        fall between the deadlines.
        """
        self.clock.advance(half_seconds / 2)

    def restart_allowed(self):
        bug = "memory-restart-dead-letters-to-old-consumers"
        if not (self.same_objects and bug in KNOWN_BUGS):
            return True
        # Avoid the known bug: a dead-letter consumer, and a message sent
        # its last time.
        return not any(k in DEAD_KEYS for s in self.slots for k in s.subs) or not any(
            key in LIVE_KEYS and holding.deliveries >= MAX_DELIVERIES
            for s in self.slots
            for (key, _), holding in s.holdings.items()
        )

    @precondition(restart_allowed)
    @rule(down=st.sampled_from([0, 5, 60]))
    def restart(self, down):
        """
        The broker stops without warning and, C{down} seconds later, starts
        again on its store; its clients connect and subscribe again.
        """
        for copy in self.copies.values():
            copy.not_before = 0.0
        clients = []
        for i, slot in enumerate(self.slots):
            for (key, n), holding in slot.holdings.items():
                # Sent its last time before the restart: it dies now.
                if key in LIVE_KEYS and holding.deliveries >= MAX_DELIVERIES:
                    self.must[key, n] = ("dead", "max-deliveries")
            self._drop_slot(i)
            if slot.conn is not None:
                clients.append((i, slot.subs))
        self.clock.advance(0)
        self.broker.stop()
        self.clock.advance(down)
        self.store = self.reopen_store(self.store)
        self.broker = self.make_broker()
        for i, subs in clients:
            self._reconnect(i, subs)

    # The check after every step

    @invariant()
    def check(self):
        now = self.clock.seconds()
        broker = self.broker
        sessions = {}
        for i, slot in enumerate(self.slots):
            if slot.conn is not None:
                session = broker._sessions.get(slot.conn)
                if session is None:
                    self.problem(f"{slot.conn.name} has no session")
                    continue
                sessions[session] = i
                self.expect(session.paused, slot.paused, f"{slot.conn.name} paused")
                if not slot.paused and slot.catchups:
                    self.problem(f"{slot.conn.name}: a getAll was not answered")
        self.expect(len(broker._sessions), len(sessions), "sessions")
        self._check_queues(now, sessions)
        self._check_in_flight(now, sessions)
        for key, where in self.must.items():
            copy = self.copies.get(key)
            what = f"n={key[1]} of {key[0]} given back"
            if copy is None:
                self.problem(f"{what}: gone")
            elif where[0] == "live" and copy.dead:
                self.problem(f"{what}: went to the dead letters {copy.dead}")
            elif where[0] == "dead" and not copy.dead:
                self.problem(f"{what}: did not go to the dead letters ({where[1]})")
            elif where[1] is not None and copy.dead != (where[1], now):
                self.problem(f"{what}: died {copy.dead}, expected {where[1]}")
        self.must.clear()
        if self.answered_len is not None:
            key, length = self.answered_len
            held = sum(1 for c in self.copies.values() if c.where == key)
            self.expect(length, held, f"length of {key} answered by subscribe")
            self.answered_len = None
        self.last_check = now
        problems, self.problems = self.problems, []
        assert not problems, "\n".join(problems)

    def _check_queues(self, now, sessions):
        broker = self.broker
        found = set()
        for key in LIVE_KEYS + DEAD_KEYS:
            queue = broker.queue(*key)
            if queue is None:
                if key in self.exists:
                    self.problem(f"queue {key} is missing")
                continue
            if key not in self.exists:
                if key in DEAD_KEYS and len(queue):
                    self.exists.add(key)
                else:
                    self.problem(f"queue {key} should not exist")
            self.expect(queue.subscribed, key in self.subscribed, f"{key} subscribed")
            watch = False
            for entry in queue.entries():
                watch = self._check_entry(now, key, entry, found, sessions) or watch
            if key in LIVE_KEYS and watch:
                if queue not in broker._expiring or not broker._sweep.running:
                    self.problem(f"{key} holds messages with a ttl but is not swept")
        self.expect(len(broker._queues), len(self.exists), "how many queues")
        for key, copy in self.copies.items():
            if key not in found:
                self.problem(f"n={copy.n} of {copy.key} is lost")

    def _check_entry(self, now, key, entry, found, sessions):
        """
        Check one entry of a queue against its copy; return whether it
        makes its queue one the expiry sweep must watch.
        """
        n = json.loads(entry.message.payload)["n"]
        what = f"n={n} in {key}"
        copy = self.copies.get((live_key(key), n))
        if copy is None:
            self.problem(f"{what}: acknowledged, deleted, a duplicate or unknown")
            return False
        if (copy.key, n) in found:
            self.problem(f"{what}: in both the queue and its dead letters")
        found.add((copy.key, n))
        self.expect(entry.message.id, copy.message_id, f"{what}: messageId")
        self.expect(entry.message.expires, copy.expires, f"{what}: expires")
        self.expect(entry.deliveries, copy.deliveries, f"{what}: deliveries")
        if key in DEAD_KEYS:
            if entry.dead is None:
                self.problem(f"{what}: a dead letter without a reason")
            elif copy.dead is None:
                reason, died = entry.dead
                if reason == "max-deliveries":
                    ok = entry.deliveries >= MAX_DELIVERIES
                elif reason == "expired":
                    ok = copy.expires is not None and copy.expires <= died
                else:
                    ok = False
                if not ok or not self.last_check <= died <= now:
                    self.problem(f"{what}: died {entry.dead} after {entry.deliveries}")
                copy.dead = entry.dead
            else:
                self.expect(entry.dead, copy.dead, f"{what}: why and when it died")
        else:
            if entry.dead is not None:
                self.problem(f"{what}: a live message with a reason to be dead")
            if copy.dead is not None:
                self.problem(f"{what}: left the dead letters without a requeue")
                copy.dead = None
        if entry.owner is None:
            if key in LIVE_KEYS and entry.deliveries >= MAX_DELIVERIES:
                self.problem(f"{what}: ready after {entry.deliveries} deliveries")
            if entry.delayed and copy.not_before <= now:
                self.problem(f"{what}: still delayed after its nack delay")
        elif entry.owner not in sessions or entry not in entry.owner.in_flight:
            self.problem(f"{what}: its owner does not hold it")
        return copy.expires is not None

    def _check_in_flight(self, now, sessions):
        # With deadlines-postponed, a deadline can wait for a later one,
        # set no more than the longest ack timeout after it.
        grace = ACK_TIMEOUT if "deadlines-postponed" in KNOWN_BUGS else 0
        held_by = {}
        for session, i in sessions.items():
            slot = self.slots[i]
            name = slot.conn.name
            for entry in session.in_flight:
                n = json.loads(entry.message.payload)["n"]
                hkey = (entry.queue.key, n)
                what = f"n={n} of {entry.queue.key} in flight to {name}"
                if hkey in held_by:
                    self.problem(f"{what}: also in flight to {held_by[hkey]}")
                held_by[hkey] = name
                if entry.owner is not session or entry.removed:
                    self.problem(
                        f"{what}: owner {entry.owner}, removed {entry.removed}"
                    )
                holding = slot.holdings.get(hkey)
                if holding is None:
                    self.problem(f"{what}: never sent there, or given up")
                    continue
                holder = entry.consumer or session
                self.expect(
                    (
                        entry.consumer is not None,
                        entry.deliveries,
                        holder.timed.get(entry),
                    ),
                    (holding.via is not None, holding.deliveries, holding.deadline),
                    f"{what}: (by subscription, deliveries, deadline)",
                )
            in_flight = {
                (e.queue.key, json.loads(e.message.payload)["n"])
                for e in session.in_flight
            }
            for hkey, holding in list(slot.holdings.items()):
                if hkey in in_flight:
                    if holding.deadline is not None and holding.deadline <= now - grace:
                        self.problem(
                            f"n={hkey[1]} of {hkey[0]} still in flight to {name} "
                            f"after its ack timeout ({holding.deadline - START})"
                        )
                    continue
                # Gone without an ack, nack, unsubscribe or disconnect: it
                # must have timed out.
                del slot.holdings[hkey]
                what = f"n={hkey[1]} of {hkey[0]} taken from {name}"
                if holding.deadline is None or holding.deadline > now:
                    self.problem(f"{what} before its ack timeout")
                else:
                    self.given_back(hkey, holding)
            for queue, consumer in session.consuming.items():
                sub = slot.subs.get(queue.key)
                if sub is None or self.broker.queue(*queue.key) is not queue:
                    self.problem(f"{name} consumes {queue.key} without subscribing")
                    continue
                self.expect(
                    (consumer.prefetch, consumer.ack_timeout),
                    (sub.prefetch, sub.ack_timeout),
                    f"{name}'s subscription to {queue.key}",
                )
                held = sum(1 for e in session.in_flight if e.consumer is consumer)
                self.expect(consumer.held, held, f"{name}'s count for {queue.key}")
            self.expect(
                {q.key for q in session.consuming},
                set(slot.subs),
                f"{name}'s subscriptions",
            )


class MemoryStoreModel(_BrokerModel):
    same_objects = True

    def open_store(self):
        return MemoryStore()

    def reopen_store(self, store):
        return store

    def close_store(self):
        pass


class SQLiteStoreModel(_BrokerModel):
    def open_store(self):
        self.scratch = tempfile.TemporaryDirectory(prefix="caps-model-")
        self.path = os.path.join(self.scratch.name, "caps.sqlite3")
        return SQLiteStore.open(
            self.path, self.clock, sync="normal", runner=synchronous
        )

    def reopen_store(self, store):
        # What the broker wrote is in the file: nothing more is written,
        # the file and its lock are let go.
        store._connection.close()
        store._lock.close()
        return SQLiteStore.open(
            self.path, self.clock, sync="normal", runner=synchronous
        )

    def close_store(self):
        self.store.close()
        self.scratch.cleanup()


class RedisStoreModel(_BrokerModel):
    """
    On the test process's shared Redis server, emptied for each example.
    """

    def open_store(self):
        server = redisserver.shared()
        with server.client() as client:
            client.flushall()
        self.url = server.url
        return RedisStore.open(self.url, self.clock, runner=synchronous)

    def reopen_store(self, store):
        # A dead process: nothing more is written, its lock is not renewed
        # and expires (at once here: deleted), its connection is gone.
        store._renewing.stop()
        store._client.delete(LOCK_KEY)
        store._client.close()
        return RedisStore.open(self.url, self.clock, runner=synchronous)

    def close_store(self):
        self.store.close()


class MemoryStoreModelTests(MemoryStoreModel.TestCase):
    settings = SETTINGS

    def test_model(self):
        """Random operations on a broker with the memory store keep it in line with the model."""
        self.runTest()


class SQLiteStoreModelTests(SQLiteStoreModel.TestCase):
    settings = SETTINGS

    def test_model(self):
        """Random operations on a broker with the SQLite store, restarts reopening the file, keep it in line with the model."""
        self.runTest()


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisStoreModelTests(RedisStoreModel.TestCase):
    settings = REDIS_SETTINGS

    def test_model(self):
        """Random operations on a broker with the Redis store, restarts reopening the database as a dead broker left it, keep it in line with the model."""
        self.runTest()
