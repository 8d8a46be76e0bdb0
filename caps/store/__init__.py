"""
Where the broker's durable state lives.

The broker keeps its queues in memory and tells its store about every
change as it makes it; the store makes the changes durable in its own time
(in groups) and says when they are, through L{IStore.flushed}.  On start
the broker takes its state from L{IStore.load}.

Three stores: L{memory.MemoryStore} (the state lives as long as the
process), L{sqlite.SQLiteStore} (a file, every confirmed change synced to
disk) and L{redis.RedisStore} (a Redis database).
"""

from collections import OrderedDict

import attrs
from zope.interface import Attribute, Interface

from caps.frames import ProtocolError

UNAVAILABLE = "the broker cannot write to its store now; try again later"
# Messages of each queue the SQLite and Redis stores keep in memory; the
# rest of a longer queue waits in the store and is read back as it drains.
WINDOW = 10_000


class StoreUnavailable(ProtocolError):
    """
    The store cannot make changes durable now (disk full, I/O error).
    """

    code = "store-unavailable"


class StoreError(SystemExit):
    """
    The store cannot be opened: twistd exits with this one-line reason.
    """


@attrs.define(eq=False)
class State:
    """
    The broker's durable state, as a store hands it over.

    @ivar queues: (clientId, event) -> L{caps.queue.Queue}, with messages.
    @ivar live: messageId -> how many queues hold that message in memory.
    @ivar seen: client-given messageId -> when it may be forgotten, in that
        order.
    @ivar seq: the last message sequence number used.
    @ivar next_qid: the number the next new queue gets.
    """

    queues: dict = attrs.Factory(dict)
    live: dict = attrs.Factory(dict)
    seen: OrderedDict = attrs.Factory(OrderedDict)
    seq: int = 0
    next_qid: int = 1


class IStore(Interface):
    """
    Durable storage for the broker's state.  The broker calls the change
    methods synchronously, in the order it makes the changes; none of them
    does I/O on the caller's thread.

    A store that commits in groups may also have C{commit_observers}, a
    list of callables it tells (on the reactor thread) the seconds each
    commit took; the metrics use it where it exists (the SQLite store).
    """

    available = Attribute("False while the store is failing to write.")
    window = Attribute(
        "How many messages of each queue the broker keeps in memory, the "
        "rest waiting in the store (read back with load_entries); None for "
        "all of them."
    )
    backlog = Attribute("How many changes are waiting to be made durable.")

    def load():
        """
        The state as last made durable, as a L{State}: every message ready
        (none in flight), each queue's messages in order; with a
        C{window}, only each queue's first C{window} messages, the rest
        counted in C{queue.spilled}.
        """

    def queue_saved(queue):
        """
        A queue was created, or its subscription (flag, filter) or length
        limit changed.
        """

    def queue_dropped(queue):
        """
        A queue and all its entries were deleted.
        """

    def message_added(message, queues):
        """
        A message was published into C{queues} (an iterable of queues).
        """

    def entry_removed(queue, message):
        """
        A message left one queue (acknowledged, or moved to another).
        """

    def entry_added(queue, entry):
        """
        A message already stored was put in another queue (dead letters,
        requeue), with C{entry.deliveries} and C{entry.dead}.
        """

    def delivered(entry):
        """
        An entry was sent to a consumer: C{entry.deliveries} is its new count.
        """

    def load_entries(queue, after, limit, wait=False):
        """
        Read back up to C{limit} messages of C{queue} with sequence numbers
        above C{after}, in order, from what is written so far (messages
        whose writing is still to come are found by a later read); with
        C{wait}, once every change recorded so far is written.

        @return: a L{Deferred} firing with a list of C{(message,
            deliveries, dead)}.
        """

    def remove_by_id(queue, message_id):
        """
        Delete the message C{message_id} from C{queue} where only the store
        has it, once every change recorded so far is durable.

        @return: a L{Deferred} firing with the sequence numbers deleted.
        """

    def id_remembered(message_id, expires):
        """
        A client-given messageId is to be treated as a duplicate until
        C{expires} (seconds since the epoch).
        """

    def pending():
        """
        L{None} if every change recorded so far is durable already; else a
        token for the batch that will make them durable: the same object
        for every call until that batch is being written, when changes
        recorded after go to a new batch.  (Replies that wait for the same
        batch can share one L{flushed} wait.)
        """

    def flushed():
        """
        L{None} if every change recorded so far is durable already; else a
        L{Deferred} that fires once it is, or fails with L{StoreUnavailable}.
        """

    def close():
        """
        Write what is pending and release the store; returns a L{Deferred}.
        """


class NothingToRecord:
    """
    L{IStore}'s change methods for a store that writes nothing behind the
    broker: the memory store (the state is the broker's own), and the
    shared Redis store (the broker asks Redis first).
    """

    def queue_saved(self, queue):
        pass

    def queue_dropped(self, queue):
        pass

    def message_added(self, message, queues):
        pass

    def entry_removed(self, queue, message):
        pass

    def entry_added(self, queue, entry):
        pass

    def delivered(self, entry):
        pass

    def id_remembered(self, message_id, expires):
        pass


def open_store(description, clock, sync="full", window=None, durable=False):
    """
    Open the store described by C{memory}, C{sqlite:PATH} or a Redis URL
    (C{redis://}, C{rediss://}, C{unix://}, C{redis+sentinel://}).

    @param durable: with Redis, confirm a write only once Redis has synced
        it (and a replica has it, where there are replicas).
    @raise StoreError: with a one-line reason if it cannot be opened.
    """
    kind, _, rest = description.partition(":")
    if kind == "memory" and not rest:
        from caps.store.memory import MemoryStore

        return MemoryStore()
    if kind == "sqlite" and rest:
        from caps.store.sqlite import SQLiteStore

        return SQLiteStore.open(rest, clock, sync=sync, window=window or WINDOW)
    if is_redis(description):
        from caps.store.redis import RedisStore

        return RedisStore.open(
            description, clock, window=window or WINDOW, durable=durable
        )
    raise StoreError(
        f"caps-broker: unknown store {description!r} "
        f"(use memory, sqlite:PATH or redis://HOST:PORT/DB)"
    )


def is_redis(description):
    """
    Whether C{description} names a Redis store.
    """
    return description.partition(":")[0] in (
        "redis",
        "rediss",
        "unix",
        "redis+sentinel",
    )
