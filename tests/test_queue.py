"""
Tests for caps.queue: FIFO order and returning messages to their place.
"""

from twisted.trial.unittest import SynchronousTestCase

from caps.queue import Message, Queue


def messages(n):
    return [Message(f"m{i}", "e", b"{}", i, 0.0) for i in range(1, n + 1)]


class QueueTests(SynchronousTestCase):
    def drain(self, queue):
        ids = []
        while (entry := queue.pop_ready()) is not None:
            ids.append(entry.message.id)
        return ids

    def test_fifo(self):
        """Messages come out in the order they went in."""
        q = Queue("c", "e")
        for m in messages(5):
            q.append(m)
        self.assertEqual(self.drain(q), ["m1", "m2", "m3", "m4", "m5"])
        self.assertEqual(len(q), 5)

    def test_given_back_goes_to_its_place(self):
        """Messages given back come out before newer ones, in their original order."""
        q = Queue("c", "e")
        for m in messages(5):
            q.append(m)
        taken = [q.pop_ready() for _ in range(3)]
        q.give_back(taken[2])
        q.give_back(taken[0])
        q.append(Message("m6", "e", b"{}", 6, 0.0))
        self.assertEqual(self.drain(q), ["m1", "m3", "m4", "m5", "m6"])

    def test_removed_are_skipped(self):
        """A message removed while ready or given back is never handed out."""
        q = Queue("c", "e")
        for m in messages(4):
            q.append(m)
        first = q.pop_ready()
        q.give_back(first)
        self.assertIs(q.remove("m1"), first)
        self.assertIsNotNone(q.remove("m3"))
        self.assertIsNone(q.remove("m3"))
        self.assertIsNone(q.remove("nope"))
        self.assertEqual(self.drain(q), ["m2", "m4"])
        self.assertEqual(len(q), 2)
        self.assertNotIn("m1", q)
        self.assertIn("m2", q)

    def test_clear(self):
        """Clearing returns every entry and leaves nothing to hand out."""
        q = Queue("c", "e")
        for m in messages(3):
            q.append(m)
        q.give_back(q.pop_ready())
        self.assertEqual(sorted(e.message.id for e in q.clear()), ["m1", "m2", "m3"])
        self.assertEqual(self.drain(q), [])
        self.assertEqual(len(q), 0)
