"""
The SQLite store: the broker's state in one file, every confirmed change
synced to disk before the confirmation goes out.

Changes are written in groups (L{caps.store.group}): all the changes of
one pass of the reactor go to disk in one transaction (one fsync).
"""

import errno
import fcntl
import json
import os
import sqlite3
import time

from zope.interface import implementer

from caps.queue import Message, Queue
from caps.store import WINDOW, IStore, State, StoreError
from caps.store.batch import coalesce
from caps.store.changes import RecordedChanges
from caps.store.group import GroupCommit
from caps.store.schema import (
    FORGET_IDS,
    MIGRATIONS,
    READ_ENTRIES,
    REMOVE_BY_ID,
    SAVE_QUEUE,
    SCHEMA,
    SCHEMA_VERSION,
)

# "CAPS" in PRAGMA application_id; the schema's version in user_version.
APPLICATION_ID = 0x43415053
SYNC_MODES = {"full": "FULL", "normal": "NORMAL"}
# Once more than FREE_PAGES_MAX pages (4 MB) are free, give all but
# FREE_PAGES_KEPT back to the file system.
FREE_PAGES_MAX = 1024
FREE_PAGES_KEPT = 256


def _lock(path):
    """
    Take the store's lock file, so that no other broker opens the store.
    """
    lock_path = path + ".lock"
    try:
        handle = open(lock_path, "a+")
    except OSError as e:
        raise StoreError(
            f"caps-broker: cannot open store sqlite:{path}: {e.strerror}"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise StoreError(
                f"caps-broker: store sqlite:{path} is in use by another broker "
                f"(pid {owner})"
            ) from None
        raise StoreError(
            f"caps-broker: cannot lock {lock_path}: {e.strerror}"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _prepare(connection, path, sync):
    """
    Check (or create) the schema and set the connection up.
    """
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id == 0 and tables == 0:
        # A new file: pages freed by deleted messages can be given back.
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if connection.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise StoreError(f"caps-broker: sqlite:{path} cannot use WAL mode")
        connection.executescript(
            f"BEGIN; {SCHEMA} PRAGMA application_id = {APPLICATION_ID};"
            f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )
    elif application_id != APPLICATION_ID:
        raise StoreError(f"caps-broker: {path} is not a CAPS store")
    elif version > SCHEMA_VERSION:
        raise StoreError(
            f"caps-broker: {path} was written by a newer CAPS (schema {version}); "
            f"this broker reads schema {SCHEMA_VERSION}"
        )
    elif version < SCHEMA_VERSION:
        _migrate(connection, version)
    if connection.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
        raise StoreError(f"caps-broker: sqlite:{path} cannot use WAL mode")
    connection.execute(f"PRAGMA synchronous = {SYNC_MODES[sync]}")
    # Keep the write-ahead log from staying large after a burst.
    connection.execute("PRAGMA journal_size_limit = 16777216")
    # A bounded cache of 32 MB (SQLite keeps 2 MB by default): reading a
    # long queue back and deleting what was delivered stay in memory.
    connection.execute("PRAGMA cache_size = -32768")


def _migrate(connection, version):
    """
    Bring a store written by an older CAPS up to this schema, in one
    transaction.
    """
    steps = "".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
    connection.executescript(
        f"BEGIN; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
    )


def _write(connection, ops, now):
    """
    Apply a batch of changes in one transaction (on the writer thread).

    @return: the seconds the transaction took, from C{BEGIN} to the end of
        C{COMMIT} (its sync included), for L{SQLiteStore.commit_observers}.
    """
    started = time.perf_counter()
    try:
        connection.execute("BEGIN IMMEDIATE")
        for sql, rows in coalesce(ops):
            connection.executemany(sql, rows)
        connection.execute(FORGET_IDS, (now,))
        connection.execute("COMMIT")
        took = time.perf_counter() - started
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    # The batch is committed: giving space back is a separate, optional
    # step, and its failure must not make the batch look unwritten.
    try:
        free = connection.execute("PRAGMA freelist_count").fetchone()[0]
        if free > FREE_PAGES_MAX:
            # executescript steps the pragma to the end; execute would free
            # a single page.
            connection.executescript(
                f"PRAGMA incremental_vacuum({free - FREE_PAGES_KEPT});"
            )
    except sqlite3.Error:
        pass
    return took


def _read_entries(connection, qid, after, limit):
    """
    Up to C{limit} messages of queue C{qid} after sequence number C{after},
    in order: C{(Message, deliveries, dead)}, C{dead} being L{None} or
    C{(reason, time)}.
    """
    return [
        (
            Message(message_id, event, bytes(payload), seq, time, expires),
            deliveries,
            None if reason is None else (reason, died),
        )
        for (
            seq,
            message_id,
            event,
            payload,
            time,
            expires,
            deliveries,
            reason,
            died,
        ) in connection.execute(READ_ENTRIES, (qid, after, limit)).fetchall()
    ]


def _remove_by_id(connection, qid, message_id):
    """
    Delete the message C{message_id} of queue C{qid}; return the sequence
    numbers of the rows deleted (none if the queue did not hold it).
    """
    return [seq for (seq,) in connection.execute(REMOVE_BY_ID, (qid, message_id))]


@implementer(IStore)
class SQLiteStore(GroupCommit, RecordedChanges):
    """
    The broker's state in an SQLite file (WAL mode), written in groups by
    one writer thread.
    """

    def __init__(self, path, clock, connection, lock, runner=None, window=WINDOW):
        super().__init__(clock, runner)
        self.path = path
        self.name = f"sqlite:{path}"
        self.window = window
        self._connection = connection
        self._lock = lock

    @property
    def handle(self):
        return self._connection

    @classmethod
    def open(cls, path, clock, sync="full", runner=None, window=WINDOW):
        """
        Open (or create) the store at C{path}.

        @param runner: how to run a write: C{runner(f, *args)} returns a
            L{Deferred}; by default, on a single writer thread.
        @param window: how many messages of each queue to keep in memory.
        @raise StoreError: with a one-line reason.
        """
        path = os.path.abspath(path)
        lock = _lock(path)
        # sqlite3 binds a bytes parameter (a payload) only after looking
        # for an adapter, and on CPython 3.11 that look-up raises and
        # clears an AttributeError each time: 0.4 µs more per row
        # inserted.  An adapter that gives the bytes back as they are is
        # found at once.  (It is the module's, for every connection; for
        # bytes it changes nothing but the time.)
        sqlite3.register_adapter(bytes, bytes)
        try:
            connection = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            _prepare(connection, path, sync)
        except sqlite3.Error as e:
            lock.close()
            raise StoreError(
                f"caps-broker: cannot open store sqlite:{path}: {e}"
            ) from None
        except StoreError:
            lock.close()
            raise
        return cls(path, clock, connection, lock, runner, window)

    def load(self):
        state = State()
        connection = self._connection
        queues = {}
        for qid, client_id, event, subscribed, flt, max_length in connection.execute(
            "SELECT qid, client_id, event, subscribed, filter, max_length FROM queues"
        ):
            queue = Queue(
                client_id,
                event,
                qid,
                filter=json.loads(flt) if flt else None,
                subscribed=bool(subscribed),
                max_length=max_length,
            )
            queues[qid] = state.queues[client_id, event] = queue
            state.next_qid = max(state.next_qid, qid + 1)
        state.seq = connection.execute(
            "SELECT coalesce(max(seq), 0) FROM entries"
        ).fetchone()[0]
        live = state.live
        for qid, count in connection.execute(
            "SELECT qid, count(*) FROM entries GROUP BY qid"
        ).fetchall():
            queue = queues[qid]
            rows = _read_entries(connection, qid, 0, self.window)
            self._fill(queue, rows, count, live)
        for message_id, expires in connection.execute(
            "SELECT id, expires FROM dedupe WHERE expires > ? ORDER BY expires",
            (self.clock.seconds(),),
        ):
            state.seen[message_id] = expires
        return state

    # Changes, recorded in order

    def queue_saved(self, queue):
        flt = json.dumps(queue.filter, sort_keys=True) if queue.filter else None
        self._record(
            SAVE_QUEUE,
            (
                queue.qid,
                queue.client_id,
                queue.event,
                int(queue.subscribed),
                flt,
                queue.max_length,
            ),
        )

    # Reading a queue's tail back

    def load_entries(self, queue, after, limit, wait=False):
        if wait:
            return self._after_writes(_read_entries, queue.qid, after, limit)
        # No need to wait for the changes recorded so far: batches commit
        # in order, so whatever of a queue's tail is written is its oldest
        # part, and the rest is read later.
        return self._run(_read_entries, self._connection, queue.qid, after, limit)

    def remove_by_id(self, queue, message_id):
        return self._after_writes(_remove_by_id, queue.qid, message_id)

    def _write_batch(self, ops, now):
        return _write(self._connection, ops, now)

    def _release(self):
        self._connection.close()
        self._lock.close()
