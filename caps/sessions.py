"""
What the broker tracks for each connection: the queues it consumes (with
their in-flight windows), the messages in flight to it, whether it can take
more, and the C{getAll} catch-ups it is being sent.
"""

from collections import OrderedDict, deque

import attrs
from zope.interface import Interface


class IConnection(Interface):
    """
    A client connection, as the broker sees it.
    """

    def deliver(entry):
        """
        Send one message to the client.

        @param entry: a L{caps.queue.Entry}: C{entry.queue} names the queue
            (clientId, event), C{entry.message} is the message, and
            C{entry.deliveries} counts this delivery (more than 1 means it
            was sent before).
        """


@attrs.define(eq=False)
class Consumer:
    """
    One connection consuming one queue.

    @ivar prefetch: the most messages from this queue in flight to it.
    @ivar ack_timeout: seconds a message may stay unacknowledged before it
        goes back to the queue; 0 for never.
    @ivar held: messages from this queue in flight to it now.
    @ivar listed: it is in its queue's C{with_room} deque.
    @ivar timed: entry -> when its ack timeout runs out, in the order they
        were sent (only with an ack timeout).
    @ivar armed: a deadline is set for its oldest timed entry.
    """

    session: "Session"
    queue: object
    prefetch: int
    ack_timeout: float
    held: int = 0
    listed: bool = False
    # An OrderedDict: a plain dict emptied from the front makes finding its
    # first item slower and slower.
    timed: OrderedDict = attrs.Factory(OrderedDict)
    armed: bool = False

    def has_room(self):
        session = self.session
        return self.held < self.prefetch and not (session.paused or session.full)


@attrs.define(eq=False)
class Catchup:
    """
    A C{getAll} being sent: its messages go out as fast as the connection
    takes them, not all at once.

    @ivar until: the last message sequence number at the request: messages
        published later are not part of it.
    @ivar done: called with the count once no message it covers is ready.
    """

    queue: object
    until: int
    done: object
    count: int = 0


@attrs.define(eq=False)
class Session:
    """
    @ivar consuming: queue -> L{Consumer}.
    @ivar in_flight: the entries sent to it and not yet acknowledged (a
        dict used as an ordered set).
    @ivar max_unacked: the most messages in flight to it.
    @ivar paused: its transport's buffer is full: send nothing more until it
        drains.
    @ivar full: it has C{max_unacked} messages in flight: send nothing more
        until some are acknowledged or given back.
    @ivar catchups: C{getAll}s not finished yet, in order.
    @ivar ack_timeout, timed, armed: as for a L{Consumer}, for the messages
        sent by C{getAll}.
    """

    connection: object
    ack_timeout: float
    max_unacked: int
    consuming: dict = attrs.Factory(dict)
    in_flight: dict = attrs.Factory(dict)
    paused: bool = False
    full: bool = False
    catchups: deque = attrs.Factory(deque)
    timed: OrderedDict = attrs.Factory(OrderedDict)
    armed: bool = False
