"""
Tests for caps.eventlog: the EVENT lines' times are what datetime says.
"""

from datetime import datetime, timezone

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caps.eventlog import _iso


class TimeTests(SynchronousTestCase):
    @given(st.floats(min_value=0, max_value=4e9))
    @example(1700000000.0)
    @example(1700000000.5)
    @example(1700000000.9999996)
    @example(1700000000.0000004)
    def test_same_as_isoformat(self, seconds):
        """The cached formatting gives datetime's isoformat in UTC, to the microsecond."""
        self.assertEqual(
            _iso(seconds), datetime.fromtimestamp(seconds, timezone.utc).isoformat()
        )
