"""
Tests for caps.routing: which subscribed queues a message goes to.
"""

from twisted.trial.unittest import SynchronousTestCase

from caps.queue import Queue
from caps.routing import SubscriptionIndex


class SubscriptionIndexTests(SynchronousTestCase):
    def setUp(self):
        self.index = SubscriptionIndex()

    def subscribe(self, client_id, event="delivered", filter=None):
        queue = Queue(client_id, event)
        self.index.add(queue, filter)
        return queue

    def test_unfiltered_gets_every_message_of_its_event(self):
        """A subscription without filter matches every message of its event and no other."""
        logger = self.subscribe("logger")
        self.assertEqual(self.index.match("delivered", {"store": "x"}), [logger])
        self.assertEqual(self.index.match("pickup", {"store": "x"}), [])

    def test_filter_on_one_field(self):
        """A filtered subscription matches only payloads with that field equal."""
        acme = self.subscribe("acme", filter={"store": "acme"})
        flowers = self.subscribe("flowers", filter={"store": "flowers"})
        self.assertEqual(
            self.index.match("delivered", {"store": "acme", "x": 1}), [acme]
        )
        self.assertEqual(self.index.match("delivered", {"store": "flowers"}), [flowers])
        self.assertEqual(self.index.match("delivered", {"store": "other"}), [])
        self.assertEqual(self.index.match("delivered", {}), [])

    def test_filter_on_several_fields(self):
        """Every field of a filter must match."""
        q = self.subscribe("q", filter={"store": "acme", "priority": 1, "tags": ["a"]})
        self.assertEqual(
            self.index.match(
                "delivered", {"store": "acme", "priority": 1, "tags": ["a"]}
            ),
            [q],
        )
        self.assertEqual(
            self.index.match(
                "delivered", {"store": "acme", "priority": 2, "tags": ["a"]}
            ),
            [],
        )
        self.assertEqual(
            self.index.match("delivered", {"store": "acme", "tags": ["a"]}), []
        )

    def test_json_equality(self):
        """Values compare as JSON: true is not 1, objects compare by content."""
        flag = self.subscribe("flag", filter={"v": True})
        nested = self.subscribe("nested", filter={"v": {"a": 1, "b": [2]}})
        self.assertEqual(self.index.match("delivered", {"v": 1}), [])
        self.assertEqual(self.index.match("delivered", {"v": True}), [flag])
        self.assertEqual(
            self.index.match("delivered", {"v": {"b": [2], "a": 1}}), [nested]
        )

    def test_resubscribe_replaces_filter(self):
        """Adding a queue again replaces its previous filter."""
        q = self.subscribe("q", filter={"store": "a"})
        self.index.add(q, {"store": "b"})
        self.assertEqual(self.index.match("delivered", {"store": "a"}), [])
        self.assertEqual(self.index.match("delivered", {"store": "b"}), [q])
        self.index.add(q, None)
        self.assertEqual(self.index.match("delivered", {"store": "a"}), [q])

    def test_remove(self):
        """A removed queue matches nothing, and removing twice is harmless."""
        a = self.subscribe("a", filter={"store": "a"})
        b = self.subscribe("b")
        self.index.remove(a)
        self.index.remove(b)
        self.index.remove(b)
        self.assertEqual(self.index.match("delivered", {"store": "a"}), [])
        self.assertEqual(self.index._filtered, {})
        self.assertEqual(self.index._unfiltered, {})

    def test_many_stores_one_lookup(self):
        """With thousands of filtered subscriptions a message still finds exactly its own."""
        queues = {
            f"s{n}": self.subscribe(f"s{n}", filter={"store": f"s{n}"})
            for n in range(5000)
        }
        self.assertEqual(
            self.index.match("delivered", {"store": "s4321"}), [queues["s4321"]]
        )
