"""
A published message.
"""

import attrs


@attrs.define(eq=False)
class Message:
    """
    A published message, shared by every queue it was routed to.  Nothing
    changes it once it is made (a frozen attrs class would take three times
    as long to build, and one is built for every publish).

    @ivar seq: the broker's publish counter: orders messages in every queue.
    @ivar payload: compact JSON bytes, encoded once at publish.
    @ivar time: when the broker accepted it, in seconds since the epoch.
    @ivar expires: when it goes to the dead letters unless delivered and
        acknowledged before, or L{None}.
    """

    id: str
    event: str
    payload: bytes
    seq: int
    time: float
    expires: float | None = None
