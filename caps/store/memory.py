"""
The memory store: the broker's state lives as long as the process.
"""

from twisted.internet import defer
from zope.interface import implementer

from caps.store import IStore, NothingToRecord, State


@implementer(IStore)
class MemoryStore(NothingToRecord):
    """
    Keeps the state object itself: a broker made again on the same store
    (in the same process) finds every queue and message, with the messages
    that were in flight ready again.  Nothing survives the process.
    """

    available = True
    backlog = 0
    # Every message stays in memory: nothing to read back.
    window = None

    def __init__(self):
        self._state = State()

    def load(self):
        return self._state

    def load_entries(self, queue, after, limit, wait=False):
        return defer.succeed([])

    def remove_by_id(self, queue, message_id):
        return defer.succeed([])

    def pending(self):
        return None

    def flushed(self):
        return None

    def close(self):
        return defer.succeed(None)
