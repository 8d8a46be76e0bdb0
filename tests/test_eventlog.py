"""
Tests for caps.eventlog: the EVENT lines say what each message's event,
time (as datetime says it) and payload are.
"""

import json
from datetime import datetime, timezone

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caps.eventlog import lines
from caps.message import Message


def expected(message):
    """
    A message's line, made the slow and obvious way.
    """
    time = datetime.fromtimestamp(message.time, timezone.utc).isoformat()
    return (
        f'EVENT {{"event": {json.dumps(message.event)}, "time": "{time}", '
        f'"payload": {message.payload.decode("utf-8")}}}'
    )


class LinesTests(SynchronousTestCase):
    @given(st.floats(min_value=0, max_value=4e9))
    @example(1700000000.0)
    @example(1700000000.5)
    @example(1700000000.9999996)
    @example(1700000000.0000004)
    def test_time_same_as_isoformat(self, seconds):
        """A line's time is datetime's isoformat in UTC, to the microsecond."""
        message = Message("m-1", "pickup", b"{}", 1, seconds)
        self.assertEqual(lines([message]), expected(message))

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["pickup", "in-transit", "caf\u00e9"]),
                st.floats(min_value=1.7e9, max_value=1.7e9 + 3),
                st.dictionaries(st.text(max_size=3), st.text(max_size=5), max_size=2),
            ),
            max_size=20,
        )
    )
    def test_batch(self, made):
        """A batch's lines are each message's line, in order, one per line, non-ASCII payloads and events included."""
        messages = [
            Message(
                f"m-{seq}",
                event,
                json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                seq,
                time,
            )
            for seq, (event, time, payload) in enumerate(made, 1)
        ]
        self.assertEqual(lines(messages), "\n".join(map(expected, messages)))
