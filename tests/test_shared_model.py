"""
Random operations on two brokers sharing one Redis, checked against what
clients saw (hypothesis): publishes through either broker, consumers
coming and going on either, acknowledgements through either, nacks, ack
timeouts.  After every step:

- no message is in flight to two connections at once;
- Redis holds every published message not yet acknowledged, in the queue
  or its dead letters, and nothing else;
- Redis marks as held in flight exactly the messages the connections hold;
- an acknowledged message is never delivered again;

and at the end, every message not acknowledged is delivered to a consumer
that acknowledges everything, and the queue is left empty.
"""

from unittest import skipIf

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps.store.sharedlayout import qid

from . import redisserver
from .helpers import RecordingConnection
from .test_shared import Cluster

ACK_TIMEOUT = 5
EXAMPLES = int(__import__("os").environ.get("CAPS_SHARED_MODEL_EXAMPLES", "15"))


class _Test:
    """
    What L{Cluster} needs of a test case.
    """

    def __init__(self, server, redis, clock):
        self.server = server
        self.redis = redis
        self.clock = clock
        self._cleanups = []
        self._case = SynchronousTestCase()

    def addCleanup(self, f, *args):
        self._cleanups.append((f, args))

    def cleanup(self):
        for f, args in reversed(self._cleanups):
            f(*args)

    def successResultOf(self, d):
        return self._case.successResultOf(d)


def _keys(name, event="pickup"):
    tag = f"caps:s:{{q{qid('driver', event)}}}"
    return f"{tag}:{name}"


class SharedMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.server = redisserver.shared()
        self.redis = self.server.client()
        self.redis.flushall()
        clock = Clock()
        clock.advance(1_700_000_000)
        self.test = _Test(self.server, self.redis, clock)
        self.cluster = Cluster(self.test, 2, max_deliveries=4)
        self.clock = clock
        self.brokers = self.cluster.brokers
        # connection -> its broker
        self.consumers = {}
        # connection -> {messageId: when sent}, held now
        self.holding = {}
        self.published = []
        self.acknowledged = set()

    def teardown(self):
        try:
            self.test.cleanup()
        finally:
            self.redis.close()

    def settle(self):
        self.cluster.settle()
        for connection in self.consumers:
            for delivery in connection.take():
                message_id = delivery["messageId"]
                assert message_id not in self.acknowledged, message_id
                self.holding[connection][message_id] = self.clock.seconds()

    @rule(broker=st.integers(0, 1), prefetch=st.integers(1, 4))
    def connect(self, broker, prefetch):
        broker = self.brokers[broker]
        connection = RecordingConnection()
        broker.connect(connection)
        self.consumers[connection] = broker
        self.holding[connection] = {}
        self.cluster.result(
            broker.subscribe(
                connection,
                "driver",
                "pickup",
                prefetch=prefetch,
                ack_timeout=ACK_TIMEOUT,
            )
        )
        self.settle()

    @precondition(lambda self: self.consumers)
    @rule(which=st.integers(0, 100))
    def disconnect(self, which):
        connection = list(self.consumers)[which % len(self.consumers)]
        self.consumers.pop(connection).disconnect(connection)
        del self.holding[connection]
        self.settle()

    @rule(broker=st.integers(0, 1), n=st.integers(1, 5))
    def publish(self, broker, n):
        for _ in range(n):
            answer = self.cluster.result(
                self.brokers[broker].publish("pickup", {}, b"{}", to=["driver"])
            )
            self.published.append(answer["messageId"])
        self.settle()

    def _held(self, which):
        held = [
            (connection, message_id)
            for connection, messages in self.holding.items()
            for message_id in messages
        ]
        return held[which % len(held)] if held else None

    @rule(which=st.integers(0, 1000), through=st.integers(0, 1))
    def acknowledge(self, which, through):
        held = self._held(which)
        if held is None:
            return
        connection, message_id = held
        answer = self.cluster.result(
            self.brokers[through].received("driver", "pickup", message_id)
        )
        assert answer["deleted"], answer
        del self.holding[connection][message_id]
        self.acknowledged.add(message_id)
        self.settle()

    @rule(which=st.integers(0, 1000))
    def nack(self, which):
        held = self._held(which)
        if held is None:
            return
        connection, message_id = held
        answer = self.consumers[connection].nack(
            connection, "driver", "pickup", message_id
        )
        assert answer["nacked"], answer
        del self.holding[connection][message_id]
        self.settle()

    @rule(seconds=st.sampled_from([1, ACK_TIMEOUT]))
    def advance(self, seconds):
        self.clock.advance(seconds)
        now = self.clock.seconds()
        for messages in self.holding.values():
            for message_id, sent in list(messages.items()):
                if sent + ACK_TIMEOUT <= now:
                    del messages[message_id]
        self.settle()

    @invariant()
    def in_flight_once(self):
        held = [m for messages in self.holding.values() for m in messages]
        assert len(held) == len(set(held)), held

    @invariant()
    def nothing_lost_nothing_extra(self):
        rows = self.redis.hkeys(_keys("rows")) + self.redis.hkeys(
            _keys("rows", "pickup.dead")
        )
        assert len(rows) == len(self.published) - len(self.acknowledged), (
            len(rows),
            len(self.published),
            len(self.acknowledged),
        )

    @invariant()
    def owned_is_what_connections_hold(self):
        owned = self.redis.hlen(_keys("owned"))
        held = sum(len(messages) for messages in self.holding.values())
        assert owned == held, (owned, held)

    def drain(self):
        """
        A consumer that acknowledges everything gets every message left.
        """
        for connection in list(self.consumers):
            self.consumers.pop(connection).disconnect(connection)
        self.holding.clear()
        # Their messages given back (to the dead letters, some) before the
        # requeue, which another broker sends.
        self.settle()
        self.cluster.result(self.brokers[1].requeue("driver", "pickup"))
        last = RecordingConnection()
        self.brokers[0].connect(last)
        self.cluster.result(self.brokers[0].subscribe(last, "driver", "pickup"))
        got = set()
        for _ in range(100):
            self.settle()
            taken = last.take()
            if not taken:
                break
            for delivery in taken:
                got.add(delivery["messageId"])
                self.cluster.result(
                    self.brokers[0].received("driver", "pickup", delivery["messageId"])
                )
        assert got == set(self.published) - self.acknowledged
        assert self.redis.hlen(_keys("rows")) == 0


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SharedModelTests(SynchronousTestCase):
    def test_random_operations(self):
        """Random operations on two shared brokers keep every invariant, and lose nothing."""

        class Machine(SharedMachine):
            def teardown(self):
                try:
                    self.drain()
                finally:
                    super().teardown()

        Machine.TestCase.settings = settings(
            max_examples=EXAMPLES,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        Machine.TestCase("runTest").runTest()
