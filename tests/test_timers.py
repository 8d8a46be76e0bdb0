"""
Tests for caps.timers: many deadlines on one timer.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caps.timers import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def test_in_time_order_with_one_timer(self):
        """Items come due in time order whatever order they were added in, with one pending call."""
        clock = Clock()
        due = []
        deadlines = Deadlines(clock, due.append)
        deadlines.add(5, "five")
        deadlines.add(2, "two")
        deadlines.add(9, "nine")
        deadlines.add(2, "two again")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(2)
        self.assertEqual(due, ["two", "two again"])
        clock.advance(3)
        self.assertEqual(due, ["two", "two again", "five"])
        clock.advance(10)
        self.assertEqual(due[-1], "nine")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop(self):
        """After stop nothing fires and no call is left."""
        clock = Clock()
        due = []
        deadlines = Deadlines(clock, due.append)
        deadlines.add(1, "x")
        deadlines.stop()
        clock.advance(5)
        self.assertEqual((due, clock.getDelayedCalls(), len(deadlines)), ([], [], 0))

    def test_added_while_firing(self):
        """A deadline added while others are handled does not postpone an earlier one."""
        clock = Clock()
        due = []

        def handle(item):
            due.append((clock.seconds(), item))
            if item == "first":
                deadlines.add(10, "added late")

        deadlines = Deadlines(clock, handle)
        deadlines.add(1, "first")
        deadlines.add(3, "second")
        clock.advance(1)
        clock.advance(2)
        self.assertEqual(due, [(1, "first"), (3, "second")])
        clock.advance(7)
        self.assertEqual(due[-1], (10, "added late"))
