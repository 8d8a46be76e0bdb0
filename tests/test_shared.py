"""
Several brokers sharing one Redis (C{--shared}), in one process: each
broker's round trips run at once on the test's thread, its time is a
L{Clock}, and what the brokers announce on the channel is handed to every
broker by L{Cluster.settle}, so each test decides when news travels.
"""

import json
from unittest import skipIf

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from caps import sharedbroker
from caps.publishing import QueueFull
from caps.sharedbroker import SharedBroker
from caps.store import StoreError, StoreUnavailable
from caps.store.redis import RedisStore
from caps.store.shared import SharedStore
from caps.store.sharedlayout import CHANNEL, qid

from . import redisserver
from .helpers import RecordingConnection
from .test_store import synchronous

# Rounds of (flush every broker's calls, hand out the news) before giving up.
SETTLE_ROUNDS = 200


class Cluster:
    """
    C{n} shared brokers on the test's Redis, one clock.
    """

    def __init__(self, test, n, **options):
        self.test = test
        self.clock = test.clock
        self.url = test.server.url
        self.events = test.redis.pubsub(ignore_subscribe_messages=True)
        self.events.subscribe(CHANNEL)
        test.addCleanup(self.events.close)
        self.options = options
        self.brokers = [self.start() for _ in range(n)]

    def start(self):
        store = SharedStore.open(self.url, self.clock, runner=synchronous, listen=False)
        broker = SharedBroker(
            clock=self.clock, store=store, log_events=False, **self.options
        )
        self.test.addCleanup(self.close, broker)
        return broker

    def close(self, broker):
        broker.stop()
        if not broker.store._closed:
            broker.store.close()
            self.settle()

    def settle(self):
        """
        Run every broker's pending round trips and hand out the news they
        announce, until there is none.
        """
        for _ in range(SETTLE_ROUNDS):
            self.clock.advance(0)
            heard = False
            while (message := self.events.get_message(timeout=0.002)) is not None:
                if message["type"] != "message":
                    continue
                heard = True
                kind, *words = message["data"].decode("utf-8").split(" ")
                for broker in self.brokers:
                    if not broker.store._closed:
                        broker.heard(kind, words)
            if not heard and not any(b.store.backlog for b in self.brokers):
                return
        raise AssertionError("the brokers did not settle")

    def result(self, d):
        """
        The result of C{d}, once the brokers have settled.
        """
        self.settle()
        return self.test.successResultOf(d)

    def failure(self, d, *kinds):
        self.settle()
        return self.test.failureResultOf(d, *kinds)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SharedBrokerTests(redisserver.OnSharedServer, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.cluster = Cluster(self, 3)
        self.a, self.b, self.c = self.cluster.brokers

    def consumer(self, broker, client_id="driver", event="pickup", **options):
        connection = RecordingConnection(client_id)
        broker.connect(connection)
        self.cluster.result(broker.subscribe(connection, client_id, event, **options))
        return connection

    def publish(self, broker, n=1, event="pickup", **options):
        return [
            self.cluster.result(
                broker.publish(event, {"n": i}, b'{"n":%d}' % i, **options)
            )
            for i in range(n)
        ]

    def test_published_on_one_delivered_on_another(self):
        """A message published through broker A reaches a consumer on broker B."""
        driver = self.consumer(self.b)
        [answer] = self.publish(self.a)
        self.cluster.settle()
        self.assertEqual(driver.ids(), [answer["messageId"]])
        self.assertEqual(answer["queues"], 1)

    def test_subscription_seen_by_the_next_publish_anywhere(self):
        """
        A publish that starts after a subscribe's answer, on any broker,
        routes to it, even before that broker heard of the subscription.
        """
        driver = RecordingConnection()
        self.b.connect(driver)
        d = self.b.subscribe(driver, "driver", "pickup")
        # Only B's round trip runs: A hears nothing before it publishes.
        self.clock.advance(0)
        self.successResultOf(d)
        answer = self.cluster.result(self.a.publish("pickup", {}, b"{}"))
        self.assertEqual(answer["queues"], 1)
        self.cluster.settle()
        self.assertEqual(driver.ids(), [answer["messageId"]])

    def test_competing_consumers_share_each_message_once(self):
        """
        Consumers of one queue on three brokers share its messages: every
        message goes to exactly one of them, and each gets some.
        """
        consumers = [
            (broker, self.consumer(broker, prefetch=5))
            for broker in self.cluster.brokers
        ]
        answers = self.publish(self.a, 300)
        seen = []
        for _ in range(100):
            self.cluster.settle()
            taken = [(b, c, c.take()) for b, c in consumers]
            if not any(t for _, _, t in taken):
                break
            for broker, _, deliveries in taken:
                for delivery in deliveries:
                    seen.append(delivery["messageId"])
                    broker.received("driver", "pickup", delivery["messageId"])
        self.assertEqual(sorted(seen), sorted(a["messageId"] for a in answers))
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual(self.redis.hlen(self.rows("driver", "pickup")), 0)

    def rows(self, client_id, event):
        from caps.store.sharedlayout import qid

        return f"caps:s:{{q{qid(client_id, event)}}}:rows"

    def test_competing_consumers_each_get_some(self):
        """
        With room for a few messages each, consumers on different brokers
        all get a share of a busy queue.
        """
        consumers = [
            self.consumer(broker, prefetch=5) for broker in self.cluster.brokers
        ]
        self.publish(self.a, 30)
        self.cluster.settle()
        self.assertEqual([len(c.deliveries) for c in consumers], [5, 5, 5])

    def test_catch_up_through_another_broker(self):
        """
        Messages queued while the driver was away are caught up through a
        different broker than the one it used before, oldest first.
        """
        driver = self.consumer(self.a)
        self.a.unsubscribe(driver, "driver", "pickup")
        self.a.disconnect(driver)
        answers = self.publish(self.b, 5)
        again = RecordingConnection()
        self.c.connect(again)
        done = self.cluster.result(self.c.get_all(again, "driver", "pickup"))
        self.assertEqual(done["count"], 5)
        self.assertEqual(again.ids(), [a["messageId"] for a in answers])

    def test_catch_up_does_not_wait_for_later_messages(self):
        """
        A getAll covers what the queue held when it asked, not what is
        published while it is being sent.
        """
        self.publish(self.a, 3, to=["vendor"])
        vendor = RecordingConnection()
        self.b.connect(vendor)
        d = self.b.get_all(vendor, "vendor", "pickup")
        self.clock.advance(0)
        self.publish(self.c, 2, to=["vendor"])
        self.assertEqual(self.cluster.result(d)["count"], 3)

    def test_catch_up_to_the_connection_limit(self):
        """
        A getAll stops at the connection's limit of unacknowledged
        messages, goes on as they are acknowledged, and answers as soon as
        the last one is sent.
        """
        answers = self.publish(self.a, 5, to=["vendor"])
        vendor = RecordingConnection()
        self.b.connect(vendor)
        self.b._sessions[vendor].max_unacked = 2
        d = self.b.get_all(vendor, "vendor", "pickup")
        sent = []
        for through in (self.b, self.c, self.a):
            self.cluster.settle()
            self.assertNoResult(d)
            taken = vendor.take()
            self.assertEqual(len(taken), 2)
            sent += taken
            for delivery in taken:
                self.cluster.result(
                    through.received("vendor", "pickup", delivery["messageId"])
                )
            if len(sent) == 4:
                break
        self.cluster.settle()
        [last] = vendor.take()
        self.assertEqual(self.successResultOf(d)["count"], 5)
        self.assertEqual(
            [m["messageId"] for m in sent + [last]],
            [a["messageId"] for a in answers],
        )

    def test_messages_in_flight_come_back_when_their_connection_goes(self):
        """A consumer leaving one broker: its messages go to a consumer on another."""
        first = self.consumer(self.a)
        [answer] = self.publish(self.b)
        self.cluster.settle()
        self.assertEqual(first.ids(), [answer["messageId"]])
        second = self.consumer(self.c)
        self.a.disconnect(first)
        self.cluster.settle()
        [delivery] = second.deliveries
        self.assertEqual(delivery["messageId"], answer["messageId"])
        self.assertTrue(delivery["redelivered"])

    def test_dedupe_across_brokers(self):
        """A messageId published through one broker is a duplicate through another."""
        self.consumer(self.a)
        [first] = self.publish(self.a, message_id="order-7")
        [second] = self.publish(self.b, message_id="order-7")
        self.assertEqual(first, {"messageId": "order-7", "queues": 1})
        self.assertEqual(
            second, {"messageId": "order-7", "queues": 0, "duplicate": True}
        )

    def test_dedupe_window_ends(self):
        """After the dedupe window, with the first copy gone, the id is free again."""
        driver = self.consumer(self.a)
        self.publish(self.a, message_id="order-7")
        self.cluster.settle()
        self.cluster.result(self.a.received("driver", "pickup", "order-7"))
        self.clock.advance(self.a.dedupe_window + 1)
        [again] = self.publish(self.b, message_id="order-7")
        self.assertEqual(again, {"messageId": "order-7", "queues": 1})
        self.cluster.settle()
        self.assertEqual(driver.ids(), ["order-7", "order-7"])

    def test_still_queued_is_a_duplicate_after_the_window(self):
        """A messageId still queued stays a duplicate past the window."""
        self.publish(self.a, to=["vendor"], message_id="order-7")
        self.clock.advance(self.a.dedupe_window + 1)
        [again] = self.publish(self.b, to=["vendor"], message_id="order-7")
        self.assertTrue(again["duplicate"])

    def test_queue_limit_across_brokers(self):
        """
        A queue's maxLength, set through one broker, refuses the publish
        that would pass it through another; nothing of it is stored.
        """
        self.consumer(self.a, client_id="slow", max_length=3, prefetch=1)
        self.publish(self.b, 3)
        failure = self.cluster.failure(
            self.c.publish("pickup", {}, b"{}", to=["vendor"]), QueueFull
        )
        self.assertIn(
            "(slow, pickup) is full: 3 messages, the limit is 3", str(failure.value)
        )
        self.assertEqual(self.redis.hlen(self.rows("vendor", "pickup")), 0)
        self.assertEqual(self.redis.hlen(self.rows("slow", "pickup")), 3)

    def test_ack_through_another_broker_frees_the_holder(self):
        """
        A message acknowledged through another broker than the one that
        sent it is deleted, and the sender's consumer gets room again.
        """
        driver = self.consumer(self.a, prefetch=1)
        first, second = self.publish(self.b, 2)
        self.cluster.settle()
        self.assertEqual(driver.ids(), [first["messageId"]])
        answer = self.cluster.result(
            self.c.received("driver", "pickup", first["messageId"])
        )
        self.assertTrue(answer["deleted"])
        self.cluster.settle()
        self.assertEqual(driver.ids(), [first["messageId"], second["messageId"]])

    def test_nack_redelivers_anywhere(self):
        """A message given back on one broker goes out again, counted, from another."""
        first = self.consumer(self.a)
        [answer] = self.publish(self.a)
        self.cluster.settle()
        self.a.unsubscribe(first, "driver", "pickup")
        second = self.consumer(self.b)
        self.cluster.settle()
        [delivery] = second.deliveries
        self.assertEqual(delivery["deliveries"], 2)
        self.assertEqual(delivery["messageId"], answer["messageId"])

    def test_nack_with_delay(self):
        """A nack with a delay keeps the message back until the delay is over."""
        driver = self.consumer(self.a)
        [answer] = self.publish(self.a)
        self.cluster.settle()
        driver.take()
        nacked = self.a.nack(driver, "driver", "pickup", answer["messageId"], delay=5)
        self.assertTrue(nacked["nacked"])
        self.cluster.settle()
        self.assertEqual(driver.take(), [])
        self.clock.advance(5)
        self.cluster.settle()
        self.assertEqual([d["deliveries"] for d in driver.take()], [2])

    def test_dead_letters_after_max_deliveries_and_requeue(self):
        """
        A message given back as often as the limit allows goes to the dead
        letters in Redis, whichever broker gave it back; a requeue through
        another broker brings it back, its count reset.
        """
        driver = self.consumer(self.a)
        [answer] = self.publish(self.b)
        message_id = answer["messageId"]
        for _ in range(self.a.max_deliveries):
            self.cluster.settle()
            self.assertEqual(driver.ids(), [message_id])
            driver.take()
            self.a.nack(driver, "driver", "pickup", message_id)
        self.cluster.settle()
        self.assertEqual(driver.take(), [])
        dead = RecordingConnection()
        self.c.connect(dead)
        self.cluster.result(self.c.get_all(dead, "driver", "pickup.dead"))
        [letter] = dead.deliveries
        self.assertEqual(letter["messageId"], message_id)
        self.c.disconnect(dead)
        self.cluster.settle()
        moved = self.cluster.result(self.b.requeue("driver", "pickup"))
        self.assertEqual(moved["requeued"], 1)
        self.cluster.settle()
        [back] = driver.take()
        self.assertEqual((back["messageId"], back["deliveries"]), (message_id, 1))

    def test_ack_timeout_gives_back_to_any_broker(self):
        """
        An unacknowledged message past its ack timeout goes back to Redis
        and out again, to a consumer on either broker.
        """
        first = self.consumer(self.a, ack_timeout=10)
        [answer] = self.publish(self.a)
        self.cluster.settle()
        other = self.consumer(self.b)
        self.assertEqual(first.take()[0]["deliveries"], 1)
        self.clock.advance(9)
        self.cluster.settle()
        self.assertEqual(first.deliveries + other.deliveries, [])
        self.clock.advance(1)
        self.cluster.settle()
        [again] = first.deliveries + other.deliveries
        self.assertEqual(
            (again["messageId"], again["deliveries"]), (answer["messageId"], 2)
        )

    def test_expired_message_goes_to_the_dead_letters(self):
        """A message past its TTL is moved to the dead letters by the heartbeat."""
        self.publish(self.a, to=["vendor"], ttl=2)
        self.clock.advance(3)
        self.cluster.settle()
        self.assertEqual(self.redis.hlen(self.rows("vendor", "pickup")), 0)
        self.assertEqual(self.redis.hlen(self.rows("vendor", "pickup.dead")), 1)

    def test_dead_broker_messages_return(self):
        """
        A broker that dies with messages in flight: once its heartbeat
        lapses, a survivor gives them back and they are delivered again.
        """
        doomed = self.consumer(self.a, prefetch=10)
        answers = self.publish(self.b, 4)
        self.cluster.settle()
        self.assertEqual(len(doomed.deliveries), 4)
        survivor = self.consumer(self.c)
        # Killed: no goodbye, its heartbeat lapses.
        self.a.store._beating.stop()
        self.cluster.brokers.remove(self.a)
        self.redis.delete(f"caps:s:alive:{self.a.store.broker_id}")
        self.clock.advance(1)
        self.cluster.settle()
        self.assertEqual(
            sorted(survivor.ids()), sorted(a["messageId"] for a in answers)
        )
        self.a.store._closed = True

    def test_closing_broker_gives_back(self):
        """A broker that stops gives its messages back at once."""
        leaving = self.consumer(self.a)
        [answer] = self.publish(self.a)
        self.cluster.settle()
        self.assertEqual(leaving.ids(), [answer["messageId"]])
        staying = self.consumer(self.b)
        self.a.store.close()
        self.cluster.settle()
        self.assertEqual(staying.ids(), [answer["messageId"]])

    def test_delete_through_another_broker(self):
        """
        Deleting a queue through one broker ends its consumers on every
        broker, and what it held.
        """
        self.consumer(self.a)
        self.publish(self.b, to=["driver"])
        other = RecordingConnection()
        self.c.connect(other)
        self.cluster.result(self.c.unsubscribe(other, "driver", "pickup", delete=True))
        self.cluster.settle()
        self.assertEqual(self.a.queue("driver", "pickup").consumers, {})
        self.assertEqual(self.a.client_rows()[0]["subscriptions"], [])
        self.assertEqual(self.redis.hlen(self.rows("driver", "pickup")), 0)
        [answer] = self.publish(self.b)
        self.assertEqual(answer["queues"], 0)

    def test_peek_and_purge_read_redis(self):
        """
        Peeking shows a queue's messages as Redis holds them, whichever
        broker holds them in flight; purging deletes those not in flight.
        """
        driver = self.consumer(self.a, prefetch=1)
        answers = self.publish(self.b, 3)
        self.cluster.settle()
        rows, more = self.cluster.result(self.c.peek("driver", "pickup", limit=2))
        self.assertEqual(
            [(r["messageId"], r["inFlight"], r["deliveries"]) for r in rows],
            [(answers[0]["messageId"], True, 1), (answers[1]["messageId"], False, 0)],
        )
        self.assertEqual(more, 1)
        self.assertEqual(rows[1]["payload"], '{"n":1}')
        self.assertEqual(self.cluster.result(self.c.purge("driver", "pickup")), 2)
        rows, more = self.cluster.result(self.c.peek("driver", "pickup"))
        self.assertEqual([r["messageId"] for r in rows], [answers[0]["messageId"]])
        self.assertEqual(driver.ids(), [answers[0]["messageId"]])

    def test_web_api_answers_from_redis(self):
        """
        The JSON API of a shared broker peeks, purges and requeues in
        Redis, answering once Redis has.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from caps.web import make_site

        from .test_web import Response

        site = make_site(self.c)

        def request(method, path):
            channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            transport = StringTransport()
            channel.makeConnection(transport)
            head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            if method == "POST":
                head += "Content-Length: 0\r\n"
            channel.dataReceived((head + "\r\n").encode())
            self.cluster.settle()
            response = Response(channel, transport)
            self.addCleanup(channel.connectionLost, None)
            return response.status, json.loads(response.body)

        [answer] = self.publish(self.a, to=["vendor"])
        status, body = request("GET", "/api/queues/vendor/pickup/messages")
        self.assertEqual(status, 200)
        self.assertEqual(
            [m["messageId"] for m in body["messages"]], [answer["messageId"]]
        )
        self.assertEqual(
            request("POST", "/api/queues/vendor/pickup/purge"), (200, {"purged": 1})
        )
        status, body = request("POST", "/api/queues/vendor/pickup/requeue")
        self.assertEqual((status, body["requeued"]), (200, 0))


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SharedStoreTests(redisserver.OnSharedServer, SynchronousTestCase):
    def test_single_broker_store_refused(self):
        """A database one broker uses alone is not opened as a shared one."""
        store = RedisStore.open(self.server.url, self.clock, runner=synchronous)
        self.addCleanup(store.close)
        with self.assertRaises(StoreError) as raised:
            SharedStore.open(self.server.url, self.clock, runner=synchronous)
        self.assertIn("without --shared", str(raised.exception))

    def test_shared_store_refused_alone(self):
        """A shared database is not opened by a broker without --shared."""
        store = SharedStore.open(
            self.server.url, self.clock, runner=synchronous, listen=False
        )
        self.addCleanup(store.close)
        with self.assertRaises(StoreError) as raised:
            RedisStore.open(self.server.url, self.clock, runner=synchronous)
        self.assertIn("start this one with --shared", str(raised.exception))


class _Answers:
    """
    A runner for a shared store's round trips that runs each at once, and
    can lose the answer of the next (C{lose}) or hold it back until told
    (C{hold}; the held answer's L{Deferred} is C{pending}).
    """

    def __init__(self):
        self.lose = 0
        self.hold = False
        self.pending = None

    refuse = 0

    def __call__(self, f, *args):
        if self.refuse:
            self.refuse -= 1
            return defer.fail(ConnectionError("Redis is out of reach"))
        result = f(*args)
        if self.lose:
            self.lose -= 1
            return defer.fail(ConnectionError("the answer was lost"))
        if self.hold:
            self.hold = False
            self.pending = defer.Deferred()
            self.result = result
            return self.pending
        return defer.succeed(result)

    def release(self):
        """
        Hand back the answer held.
        """
        self.pending.callback(self.result)


class _TwoBrokers(redisserver.OnSharedServer):
    """
    Two shared brokers, C{a} and C{b}, on the test's Redis.
    """

    def setUp(self):
        super().setUp()
        self.cluster = Cluster(self, 2)
        self.a, self.b = self.cluster.brokers

    def consumer(self, broker, client_id="driver", event="pickup", **options):
        connection = RecordingConnection(client_id)
        broker.connect(connection)
        self.cluster.result(broker.subscribe(connection, client_id, event, **options))
        return connection

    def rows(self, client_id, event):
        return self.redis.hlen(f"caps:s:{{q{qid(client_id, event)}}}:rows")


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SharedReviewTests(_TwoBrokers, SynchronousTestCase):
    """
    The bugs a review of the shared brokers found, each with its
    reproduction.
    """

    def test_save_that_changes_nothing_does_not_hide_another_change(self):
        """
        A subscribe that changes nothing, on a broker that has not heard of
        another broker's new subscription, does not make it skip it.
        """
        self.consumer(self.a)
        vendor = RecordingConnection()
        self.b.connect(vendor)
        d = self.b.subscribe(vendor, "vendor", "pickup")
        self.clock.advance(0)
        self.successResultOf(d)
        again = RecordingConnection()
        self.a.connect(again)
        d = self.a.subscribe(again, "driver", "pickup")
        self.clock.advance(0)
        self.successResultOf(d)
        d = self.a.publish("pickup", {}, b"{}")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d)["queues"], 2)

    def test_nothing_claimed_after_leaving(self):
        """
        A give-back asked for in the same pass as the broker closing runs
        before it leaves; no claim goes out after, so nothing is left held
        by a broker that is gone.
        """
        held = self.consumer(self.a, prefetch=1)
        first = self.cluster.result(self.b.publish("pickup", {}, b"{}"))
        second = self.cluster.result(self.b.publish("pickup", {}, b"{}"))
        self.cluster.settle()
        self.a.stop()
        self.a.store.close()
        self.a.nack(held, "driver", "pickup", first["messageId"])
        self.cluster.settle()
        self.cluster.brokers.remove(self.a)
        other = self.consumer(self.b)
        self.cluster.settle()
        self.assertEqual(
            sorted(other.ids()), sorted([first["messageId"], second["messageId"]])
        )

    def test_broker_given_up_for_dead_forgets_what_it_held(self):
        """
        A live broker whose heartbeat lapsed (Redis out of reach or busy
        for longer) learns at its next beat that its messages were given
        back, and forgets them: its consumer's slot is free, the message is
        not sent twice by it, and an acknowledgement still deletes it.
        """
        held = self.consumer(self.a, prefetch=1, ack_timeout=0)
        [answer] = [self.cluster.result(self.b.publish("pickup", {}, b"{}"))]
        self.cluster.settle()
        self.assertEqual(held.ids(), [answer["messageId"]])
        self.redis.delete(f"caps:s:alive:{self.a.store.broker_id}")
        self.b.store._beat()
        self.cluster.settle()
        self.a.store._beat()
        self.cluster.settle()
        # Its consumer has room again: it gets the message again, once,
        # and holds only that.
        session = self.a._sessions[held]
        self.assertEqual(held.ids(), [answer["messageId"]] * 2)
        self.assertEqual(len(session.in_flight), 1)
        self.cluster.result(self.a.received("driver", "pickup", answer["messageId"]))
        self.cluster.settle()
        self.assertEqual(self.rows("driver", "pickup"), 0)
        self.assertEqual(len(session.in_flight), 0)

    def test_broker_given_up_for_dead_claims_nothing_until_it_beats(self):
        """A broker whose heartbeat lapsed is refused claims until it beats again."""
        self.redis.delete(f"caps:s:alive:{self.a.store.broker_id}")
        self.b.store._beat()
        self.cluster.settle()
        self.cluster.result(self.b.publish("pickup", {}, b"{}", to=["driver"]))
        early = RecordingConnection()
        self.a.connect(early)
        self.cluster.result(self.a.subscribe(early, "driver", "pickup"))
        self.assertEqual(early.ids(), [])
        self.clock.advance(1)
        self.cluster.settle()
        self.assertEqual(len(early.ids()), 1)
        self.flushLoggedErrors()

    def test_claimed_and_never_sent_is_not_counted(self):
        """
        Consumers that leave before their claim is answered do not use up
        a message's deliveries: it is never dead-lettered undelivered.
        """
        cluster = Cluster(self, 1, max_deliveries=3)
        [broker] = cluster.brokers
        [answer] = [cluster.result(broker.publish("pickup", {}, b"{}", to=["x"]))]
        for _ in range(3):
            gone = RecordingConnection()
            broker.connect(gone)
            broker.subscribe(gone, "x", "pickup")
            broker.disconnect(gone)
            cluster.settle()
        last = RecordingConnection()
        broker.connect(last)
        cluster.result(broker.subscribe(last, "x", "pickup"))
        cluster.settle()
        self.assertEqual(last.ids(), [answer["messageId"]])
        self.assertEqual(last.deliveries[0]["deliveries"], 1)

    def test_catch_up_ends_only_when_all_sent(self):
        """
        A getAll whose claim came back while its connection was full gives
        those back uncounted and goes on once there is room.
        """
        cluster = Cluster(self, 1, max_unacked=3)
        [broker] = cluster.brokers
        for _ in range(3):
            cluster.result(broker.publish("other", {}, b"{}", to=["me"]))
        for _ in range(2):
            cluster.result(broker.publish("pickup", {}, b"{}", to=["me"]))
        me = RecordingConnection()
        broker.connect(me)
        subscribed = broker.subscribe(me, "me", "other")
        d = broker.get_all(me, "me", "pickup")
        cluster.settle()
        self.successResultOf(subscribed)
        for delivery in me.take():
            cluster.result(
                broker.received("me", delivery["event"], delivery["messageId"])
            )
        cluster.settle()
        self.assertEqual(self.successResultOf(d)["count"], 2)
        self.assertEqual([x["deliveries"] for x in me.deliveries], [1, 1])

    def test_purge_not_run_twice(self):
        """
        A purge whose answer was lost is not run again (it would delete
        what was confirmed since): the client is told to try again.
        """
        self.a.store._runner = runner = _Answers()
        self.cluster.result(self.b.publish("pickup", {}, b"{}", to=["vendor"]))
        runner.lose = 1
        d = self.a.purge("vendor", "pickup")
        self.clock.advance(0)
        self.failureResultOf(d, StoreUnavailable)
        self.cluster.result(self.b.publish("pickup", {}, b"{}", to=["vendor"]))
        self.clock.advance(1)
        self.cluster.settle()
        self.assertEqual(self.rows("vendor", "pickup"), 1)
        self.flushLoggedErrors(ConnectionError)

    def test_lost_claim_undone_without_undoing_another(self):
        """
        A claim whose answer was lost is undone only once the queue's
        other claims are answered, so a getAll's messages are not given
        back while it sends them.
        """
        ids = [
            self.cluster.result(self.b.publish("pickup", {}, b"{}", to=["driver"]))[
                "messageId"
            ]
            for _ in range(3)
        ]
        self.a.store._runner = runner = _Answers()
        consumer = RecordingConnection()
        self.a.connect(consumer)
        runner.hold = True
        self.a.subscribe(consumer, "driver", "pickup", prefetch=1)
        self.clock.advance(0)
        catching = RecordingConnection()
        self.a.connect(catching)
        self.a.get_all(catching, "driver", "pickup")
        runner.pending.errback(ConnectionError("the answer was lost"))
        # The subscription's save is tried again a second later.
        self.clock.advance(1)
        self.cluster.settle()
        other = RecordingConnection()
        self.b.connect(other)
        self.cluster.result(self.b.subscribe(other, "driver", "pickup"))
        self.cluster.settle()
        self.assertEqual(set(catching.ids()) & set(other.ids()), set())
        self.assertEqual(
            sorted(catching.ids() + other.ids() + consumer.ids()), sorted(ids)
        )
        self.flushLoggedErrors(ConnectionError)

    def test_paused_consumer_does_not_hoard(self):
        """
        Messages claimed for a consumer that paused before they came are
        given back for consumers elsewhere.
        """
        for _ in range(20):
            self.cluster.result(self.b.publish("pickup", {}, b"{}", to=["driver"]))
        slow = RecordingConnection()
        self.a.connect(slow)
        self.a.subscribe(slow, "driver", "pickup", prefetch=50)
        self.a.pause(slow)
        self.cluster.settle()
        fast = RecordingConnection()
        self.b.connect(fast)
        self.cluster.result(self.b.subscribe(fast, "driver", "pickup", prefetch=50))
        self.cluster.settle()
        self.assertEqual(len(fast.ids()), 20)
        self.assertEqual({d["deliveries"] for d in fast.deliveries}, {1})

    def test_requeue_of_an_empty_message_id_is_of_none(self):
        """requeue with messageId "" moves nothing (as on one broker), not everything."""
        cluster = Cluster(self, 1, max_deliveries=1)
        [broker] = cluster.brokers
        driver = RecordingConnection()
        broker.connect(driver)
        cluster.result(broker.subscribe(driver, "driver", "pickup"))
        ids = [
            cluster.result(broker.publish("pickup", {}, b"{}"))["messageId"]
            for _ in range(2)
        ]
        cluster.settle()
        for message_id in ids:
            broker.nack(driver, "driver", "pickup", message_id)
        broker.unsubscribe(driver, "driver", "pickup")
        cluster.settle()
        self.assertEqual(self.rows("driver", "pickup.dead"), 2)
        answer = cluster.result(broker.requeue("driver", "pickup", ""))
        self.assertEqual(answer["requeued"], 0)
        self.assertEqual(
            cluster.result(broker.requeue("driver", "pickup"))["requeued"], 2
        )

    def test_broker_made_id_a_client_took_is_not_reused(self):
        """
        A client that publishes with the messageId the broker would make
        next does not get its message confused with the broker's: each
        keeps an id of its own, and acknowledging one leaves the other.
        """
        # Its own publish takes sequence number 1; the next is 2.
        taken = f"{self.a.store.broker_id}-2"
        [mine] = [
            self.cluster.result(
                self.a.publish("pickup", {}, b"{}", to=["driver"], message_id=taken)
            )
        ]
        made = self.cluster.result(self.a.publish("pickup", {}, b"{}", to=["driver"]))
        self.assertEqual(mine["messageId"], taken)
        self.assertNotEqual(made["messageId"], taken)
        self.cluster.result(self.b.received("driver", "pickup", taken))
        self.assertEqual(self.rows("driver", "pickup"), 1)

    def test_publish_run_again_after_redis_forgot_the_scripts_is_announced(self):
        """
        After Redis forgot the scripts (restarted, failed over), a publish
        run again is announced again, so consumers elsewhere hear of it.
        """
        consumer = self.consumer(self.a)
        self.redis.script_flush()
        self.cluster.result(self.b.publish("pickup", {}, b"{}"))
        self.cluster.settle()
        self.assertEqual(len(consumer.ids()), 1)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SharedSecondReviewTests(_TwoBrokers, SynchronousTestCase):
    """
    What a second review found in the first one's fixes.
    """

    def test_lapse_learnt_although_an_answer_was_lost(self):
        """
        A broker given up for dead whose first heartbeat after it loses
        its answer still learns of it at the next, and forgets what it
        held.
        """
        held = self.consumer(self.a, prefetch=1, ack_timeout=30)
        answer = self.cluster.result(self.b.publish("pickup", {}, b"{}"))
        self.cluster.settle()
        self.redis.delete(f"caps:s:alive:{self.a.store.broker_id}")
        self.b.store._beat()
        self.cluster.settle()
        self.a.store._runner = runner = _Answers()
        runner.lose = 1
        self.a.store._beat()
        self.clock.advance(0)
        self.clock.advance(1)
        self.cluster.settle()
        # Forgotten, then claimed again for its consumer: sent a second
        # time, held once.
        self.assertEqual(held.ids(), [answer["messageId"]] * 2)
        self.assertEqual(len(self.a._sessions[held].in_flight), 1)
        self.flushLoggedErrors(ConnectionError)

    def test_catch_up_refused_goes_on_after_the_heartbeat(self):
        """
        A getAll on a broker not beating yet waits for its heartbeat and
        then sends everything, instead of answering 0.
        """
        for _ in range(3):
            self.cluster.result(self.b.publish("pickup", {}, b"{}", to=["vendor"]))
        self.redis.delete(f"caps:s:alive:{self.a.store.broker_id}")
        vendor = RecordingConnection()
        self.a.connect(vendor)
        d = self.a.get_all(vendor, "vendor", "pickup")
        self.cluster.settle()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.cluster.settle()
        self.assertEqual(self.successResultOf(d)["count"], 3)

    def test_requeue_does_not_move_a_message_twice(self):
        """
        Dead letters that die again while a long requeue goes on (claimed
        on another broker, expired) are not moved again: it ends.
        """
        self.patch(sharedbroker, "CHUNK", 3)
        for _ in range(7):
            self.cluster.result(
                self.a.publish("pickup", {}, b"{}", to=["driver"], ttl=1)
            )
        self.clock.advance(2)
        self.cluster.settle()
        self.assertEqual(self.rows("driver", "pickup.dead"), 7)
        self.consumer(self.b)
        answer = self.cluster.result(self.a.requeue("driver", "pickup"))
        self.assertEqual(answer["requeued"], 7)

    def test_publish_after_a_purge_is_not_purged(self):
        """A publish asked after a purge, in the same pass, is not run before it."""
        first = self.a.publish("pickup", {}, b"{}", to=["vendor"])
        purged = self.a.purge("vendor", "pickup")
        second = self.a.publish("pickup", {}, b"{}", to=["vendor"])
        self.cluster.settle()
        self.successResultOf(first)
        self.assertEqual(self.successResultOf(purged), 1)
        kept = self.successResultOf(second)["messageId"]
        rows, _ = self.cluster.result(self.a.peek("vendor", "pickup"))
        self.assertEqual([r["messageId"] for r in rows], [kept])

    def test_expired_before_it_was_sent_is_not_counted(self):
        """
        A claimed message found expired before it is sent goes to the dead
        letters as expired, with no delivery counted.
        """
        cluster = Cluster(self, 1, max_deliveries=1)
        [broker] = cluster.brokers
        cluster.result(broker.publish("pickup", {}, b"{}", to=["x"], ttl=1))
        broker.store._runner = runner = _Answers()
        x = RecordingConnection()
        broker.connect(x)
        runner.hold = True
        broker.subscribe(x, "x", "pickup")
        self.clock.advance(0)
        self.clock.advance(2)
        runner.release()
        cluster.settle()
        self.assertEqual(x.ids(), [])
        rows, _ = cluster.result(broker.peek("x", "pickup.dead"))
        self.assertEqual([r["deliveries"] for r in rows], [0])
        [row] = self.redis.hvals(f"caps:s:{{q{qid('x', 'pickup.dead')}}}:rows")
        self.assertIn(b'"expired"', row)

    def test_failed_delete_routes_by_what_redis_has(self):
        """
        A delete that never reached Redis leaves the subscription there,
        and the broker that asked routes by it again.
        """
        driver = self.consumer(self.b)
        self.cluster.settle()
        gone = RecordingConnection()
        self.a.connect(gone)
        self.a.store._runner = runner = _Answers()
        runner.refuse = 1
        d = self.a.unsubscribe(gone, "driver", "pickup", delete=True)
        self.clock.advance(0)
        self.failureResultOf(d, StoreUnavailable)
        self.cluster.settle()
        answer = self.cluster.result(self.a.publish("pickup", {}, b"{}"))
        self.assertEqual(answer["queues"], 1)
        self.cluster.settle()
        self.assertEqual(driver.ids(), [answer["messageId"]])
        self.flushLoggedErrors(ConnectionError)

    def test_lost_claim_of_a_queue_deleted_and_made_again(self):
        """
        A lost claim of a queue deleted and made again meanwhile does not
        give back what the new one's claim took.
        """
        cluster = Cluster(self, 2, max_deliveries=2)
        a, b = cluster.brokers
        first = RecordingConnection()
        a.connect(first)
        cluster.result(a.subscribe(first, "driver", "pickup", prefetch=5))
        m = cluster.result(b.publish("pickup", {}, b"{}", to=["driver"]))["messageId"]
        cluster.settle()
        a.nack(first, "driver", "pickup", m)
        cluster.settle()
        a.nack(first, "driver", "pickup", m)
        cluster.settle()
        old = a._queues["driver", "pickup"]
        a.store._runner = runner = _Answers()
        runner.hold = True
        a._woken(old)
        self.clock.advance(0)
        a.unsubscribe(first, "driver", "pickup", delete=True)
        a.requeue("driver", "pickup")
        second = RecordingConnection()
        a.connect(second)
        a.subscribe(second, "driver", "pickup", prefetch=5)
        runner.pending.errback(ConnectionError("the answer was lost"))
        self.clock.advance(1)
        cluster.settle()
        other = RecordingConnection()
        b.connect(other)
        cluster.result(b.subscribe(other, "driver", "pickup"))
        cluster.settle()
        self.assertEqual(second.ids(), [m])
        self.assertEqual(other.ids(), [])
        self.flushLoggedErrors(ConnectionError)


@skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class SharedLongQueueTests(redisserver.OnSharedServer, SynchronousTestCase):
    """
    Purge and requeue move a long queue a chunk at a time, and a peek
    reads only what it shows (and what is in flight), so that no one
    script keeps Redis, and with it every broker's heartbeat, busy for
    long.
    """

    def setUp(self):
        super().setUp()
        self.patch(sharedbroker, "CHUNK", 3)
        self.cluster = Cluster(self, 1, max_deliveries=1)
        [self.broker] = self.cluster.brokers

    def publish(self, n, to="vendor"):
        return [
            self.cluster.result(self.broker.publish("pickup", {}, b"{}", to=[to]))[
                "messageId"
            ]
            for _ in range(n)
        ]

    def test_purge_in_chunks(self):
        """A purge of more than a chunk deletes them all and counts them all."""
        self.publish(7)
        self.assertEqual(self.cluster.result(self.broker.purge("vendor", "pickup")), 7)
        rows, more = self.cluster.result(self.broker.peek("vendor", "pickup"))
        self.assertEqual((rows, more), ([], 0))

    def test_purge_leaves_what_is_published_meanwhile(self):
        """A purge in chunks deletes what was queued when it began, not what comes after."""
        self.publish(4)
        self.broker.store._runner = runner = _Answers()
        runner.hold = True
        d = self.broker.purge("vendor", "pickup")
        self.clock.advance(0)
        # Published while the first chunk's answer is on its way: the next
        # chunk runs after it.
        published = self.broker.publish("pickup", {}, b"{}", to=["vendor"])
        runner.release()
        later = self.cluster.result(published)["messageId"]
        self.assertEqual(self.cluster.result(d), 4)
        rows, _ = self.cluster.result(self.broker.peek("vendor", "pickup"))
        self.assertEqual([r["messageId"] for r in rows], [later])

    def test_requeue_in_chunks(self):
        """A requeue of more dead letters than a chunk moves them all."""
        driver = RecordingConnection()
        self.broker.connect(driver)
        self.cluster.result(self.broker.subscribe(driver, "driver", "pickup"))
        ids = self.publish(7, to="driver")
        self.cluster.settle()
        self.broker.unsubscribe(driver, "driver", "pickup")
        self.cluster.settle()
        answer = self.cluster.result(self.broker.requeue("driver", "pickup"))
        self.assertEqual(answer["requeued"], 7)
        rows, _ = self.cluster.result(self.broker.peek("driver", "pickup"))
        self.assertEqual([r["messageId"] for r in rows], ids)

    def test_peek_merges_ready_and_in_flight_in_order(self):
        """A peek shows ready and in-flight messages together, in order, from after."""
        ids = self.publish(6, to="driver")
        driver = RecordingConnection()
        self.broker.connect(driver)
        self.cluster.result(
            self.broker.subscribe(driver, "driver", "pickup", prefetch=2)
        )
        self.cluster.settle()
        rows, more = self.cluster.result(
            self.broker.peek("driver", "pickup", after=0, limit=4)
        )
        self.assertEqual([r["messageId"] for r in rows], ids[:4])
        self.assertEqual([r["inFlight"] for r in rows], [True, True, False, False])
        self.assertEqual(more, 2)
        rows, more = self.cluster.result(
            self.broker.peek("driver", "pickup", after=rows[1]["seq"], limit=2)
        )
        self.assertEqual([r["messageId"] for r in rows], ids[2:4])
        self.assertEqual(more, 2)
