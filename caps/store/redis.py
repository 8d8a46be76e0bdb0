"""
The Redis store: the broker's state in a Redis database.

The same contract as the SQLite store (L{caps.store.IStore}): the broker
keeps its queues in memory, each queue's first C{window} messages, and
records every change; the changes of one pass of the reactor go to Redis
in one Lua script call on the writer thread (L{caps.store.group}), and a
publish is confirmed once Redis has accepted the transaction that holds
it.  With C{durable}, also once Redis has written it to its append-only
file and synced it (C{WAITAOF} on Redis 7.2 and later; on older servers,
C{appendfsync always} is required, which syncs before Redis answers) and,
where the server has replicas, once one replica has it.

The client is redis-py's synchronous one, on the writer thread: the
reactor never waits for Redis, and the store shares the SQLite store's
group commit instead of a second, asynchronous way of writing.

The keys and the scripts are in L{caps.store.redislayout} (and
docs/scaling.md).
"""

import json
import os
import time
import uuid

from twisted.internet import task
from zope.interface import implementer

from caps.queue import Queue
from caps.store import (
    UNAVAILABLE,
    WINDOW,
    IStore,
    State,
    StoreError,
    StoreUnavailable,
)
from caps.store import redislayout as layout
from caps.store.changes import RecordedChanges
from caps.store.group import GroupCommit
from caps.store.redisconnect import connect, opening, shown, version
from caps.store.redislayout import DEDUPE_KEY, LAYOUT, LAYOUT_KEY, LOCK_KEY, QUEUES_KEY
from caps.store.schema import (
    SAVE_QUEUE,
)

# Seconds the lock lasts unless renewed; renewed every LOCK_RENEW seconds.
# A broker killed without closing holds the store until it expires.
LOCK_TTL = 5.0
LOCK_RENEW = 1.0
LOCK_MS = int(LOCK_TTL * 1000)
# Counts the brokers that took the lock: a broker whose lock expired (it
# was cut off from Redis) takes it again only if nobody took it meanwhile.
EPOCH_KEY = "caps:lock:epoch"
# Seconds a durable write waits for the sync and the replica.
DURABLE_TIMEOUT = 5.0

# KEYS: the lock, the epoch.  ARGV: token, milliseconds.  The new epoch if
# the lock was free and is taken, else nothing.
_TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
"""

# KEYS: the lock, the epoch.  ARGV: token, milliseconds, epoch.  1 if the
# lock is this broker's (renewed, or taken again after it expired with no
# other broker taking it since), 0 if another broker took it, -1 if Redis
# has lost the epoch itself (its data is gone).
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  return -1
end
if not holder and epoch == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lock.  ARGV: token.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


_OTHER_BROKER = "another broker holds its lock now"
_DATA_LOST = (
    "Redis has lost writes this broker made (restarted from an older "
    "snapshot, or a failover to a replica that lacked them): confirmed "
    "messages may be gone"
)


class LockLost(Exception):
    """
    Another broker holds the store's lock: this one must not write.
    """


class DataLost(Exception):
    """
    Redis no longer has writes this broker made (it restarted from an older
    snapshot, or failed over to a replica that had not had them): its
    state and the broker's differ, and writing on would make it worse.
    """


# Counts the transactions written to the store: each write checks that
# Redis still has every one this broker made.
WRITTEN_KEY = "caps:written"
# The lock token of the broker that wrote the last transaction.
WRITER_KEY = "caps:written:by"


def check_durable(client, name):
    """
    How a durable write waits: C{"waitaof"} (Redis 7.2+) or C{"always"}
    (the server syncs every write before it answers); and how many
    replicas the server has now.

    @raise StoreError: if the server can do neither.
    """
    persistence = client.info("persistence")
    if not persistence.get("aof_enabled"):
        raise StoreError(f"caps-broker: --redis-durable needs appendonly yes on {name}")
    replicas = _replicas(client)
    if version(client) >= (7, 2):
        return "waitaof", replicas
    try:
        fsync = client.config_get("appendfsync").get("appendfsync")
    except Exception:
        fsync = None
    if fsync != "always":
        raise StoreError(
            f"caps-broker: --redis-durable needs Redis 7.2 or later (WAITAOF), "
            f"or appendfsync always, on {name}"
        )
    return "always", replicas


def _replicas(client):
    """
    How many replicas the primary has connected now.
    """
    return client.info("replication").get("connected_slaves", 0)


@implementer(IStore)
class RedisStore(GroupCommit, RecordedChanges):
    """
    The broker's state in a Redis database, written in groups by one
    writer thread.

    @ivar durable: how confirmed writes wait beyond Redis accepting them:
        L{None}, C{"waitaof"} or C{"always"} (see L{check_durable}).
    @ivar replicas: with C{durable}, how many replicas the primary had at
        the last look (every L{LOCK_RENEW} seconds): a write waits for one
        if there is any.  A primary that lost its replicas (say, just after
        a failover) goes on without; to refuse writes then, set Redis's own
        C{min-replicas-to-write}.
    """

    def __init__(
        self,
        url,
        clock,
        client,
        lease,
        runner=None,
        window=WINDOW,
        durable=None,
    ):
        super().__init__(clock, runner)
        self.name = shown(url)
        self.window = window
        self.durable, self.replicas = durable or (None, 0)
        self._client = client
        # This broker's lock, the count of brokers that had taken it when
        # this one did, and the transactions written to the store so far
        # (see _WriteCheck).
        token, self._epoch, written = lease
        self._token = token
        self._check = _WriteCheck(token, written)
        self._scripts = layout.Scripts(client)
        self._renew_lock = client.register_script(_RENEW)
        self._renewing = task.LoopingCall(self._renew)
        self._renewing.clock = clock
        self._renewing.start(LOCK_RENEW, now=False)

    @property
    def handle(self):
        return self._client

    @classmethod
    def open(
        cls, url, clock, runner=None, window=WINDOW, durable=False, lock_wait=None
    ):
        """
        Open the store in the Redis database at C{url}, waiting up to
        C{lock_wait} seconds (L{LOCK_TTL} and one more by default) for a
        broker that stopped without closing it to let it go.

        @raise StoreError: with a one-line reason, the password left out.
        """
        name = shown(url)
        client = connect(url)
        token = f"{uuid.uuid4().hex} pid {os.getpid()}"
        if lock_wait is None:
            lock_wait = LOCK_TTL + 1.0
        with opening(client, name):
            _check_layout(client, name)
            how = check_durable(client, name) if durable else None
            epoch = _take_lock(client, token, name, lock_wait)
            written = int(client.get(WRITTEN_KEY) or 0)
        return cls(url, clock, client, (token, epoch, written), runner, window, how)

    def load(self):
        state = State()
        client = self._client
        queues = {}
        for qid, fields in client.hgetall(QUEUES_KEY).items():
            qid = int(qid)
            client_id, event, subscribed, flt, max_length = json.loads(fields)
            queue = Queue(
                client_id,
                event,
                qid,
                filter=flt,
                subscribed=subscribed,
                max_length=max_length,
            )
            queues[qid] = state.queues[client_id, event] = queue
            state.next_qid = max(state.next_qid, qid + 1)
        live = state.live
        # Each queue's length and last sequence number, in one round trip.
        pipe = client.pipeline(transaction=False)
        for qid in queues:
            seqs = layout.keys(qid)[0]
            pipe.zcard(seqs)
            pipe.zrange(seqs, -1, -1)
        found = pipe.execute()
        for (qid, queue), count, last in zip(
            queues.items(), found[::2], found[1::2], strict=True
        ):
            if not count:
                continue
            state.seq = max(state.seq, int(last[0]))
            rows = layout.read_entries(client, self._scripts, qid, 0, self.window)
            self._fill(queue, rows, count, live)
        for message_id, expires in client.zrange(
            DEDUPE_KEY,
            f"({self.clock.seconds()!r}",
            "+inf",
            byscore=True,
            withscores=True,
        ):
            state.seen[message_id.decode("utf-8")] = expires
        return state

    # Changes, recorded in order

    def queue_saved(self, queue):
        self._record(
            SAVE_QUEUE,
            (
                queue.qid,
                queue.client_id,
                queue.event,
                queue.subscribed,
                queue.filter,
                queue.max_length,
            ),
        )

    def _removal(self, queue, message):
        # The messageId too: the batch script forgets it without reading
        # the row.
        return (queue.qid, message.seq, message.id)

    # Reading a queue's tail back

    def load_entries(self, queue, after, limit, wait=False):
        if wait:
            return self._after_writes(
                layout.read_entries, self._scripts, queue.qid, after, limit
            )
        # As with SQLite: transactions apply in order, so what of a queue's
        # tail is written is its oldest part, and the rest is read later.
        return self._run(
            layout.read_entries, self._client, self._scripts, queue.qid, after, limit
        )

    def remove_by_id(self, queue, message_id):
        d = self._after_writes(
            _remove_id, self._scripts, self._check, queue.qid, message_id
        )
        d.addErrback(self._removal_failed)
        return d

    def _removal_failed(self, failure):
        if self._gives_up(failure):
            raise StoreUnavailable(UNAVAILABLE)
        return failure

    # Writing

    def _write_batch(self, ops, now):
        return _write(
            self._client,
            self._scripts,
            self._check,
            ops,
            now,
            self.durable,
            self.replicas,
        )

    def _gives_up(self, failure):
        if failure.check(LockLost):
            self._stop(_OTHER_BROKER)
        elif failure.check(DataLost):
            self._stop(_DATA_LOST)
        return self._stopped

    def _stop(self, why):
        if not self._stopped:
            self.log.critical(
                "store {store}: " + why + "; this broker stops writing to it and "
                "refuses changes until it is restarted",
                store=self.name,
            )
            if self._renewing.running:
                self._renewing.stop()
        self.stop_writing()

    def _renew(self):
        """
        Keep the lock, or take it again if it expired while this broker was
        cut off from Redis and no other broker took it meanwhile.  If one
        did, stop writing: two brokers writing one store would lose
        messages.
        """
        d = self._run(
            _keep,
            self._client,
            self._renew_lock,
            [self._token, LOCK_MS, self._epoch],
            self.durable is not None,
        )
        d.addCallbacks(self._renewed, self._renew_failed)

    def _renewed(self, kept):
        ours, replicas = kept
        if ours != 1 and not self._closed:
            self._stop(_OTHER_BROKER if ours == 0 else _DATA_LOST)
        if replicas is not None:
            self.replicas = replicas

    def _renew_failed(self, failure):
        self.log.warn(
            "store {store}: cannot renew its lock: {error}",
            store=self.name,
            error=failure.getErrorMessage(),
        )

    def _release(self):
        if self._renewing.running:
            self._renewing.stop()
        if not self._stopped:
            try:
                self._client.eval(_UNLOCK, 1, LOCK_KEY, self._token)
            except Exception as e:
                # It expires by itself.
                self.log.warn(
                    "store {store}: cannot let go of its lock: {error}",
                    store=self.name,
                    error=str(e),
                )
        self._client.close()


def _check_layout(client, name):
    layout = client.get(LAYOUT_KEY)
    if layout == b"shared-1":
        raise StoreError(
            f"caps-broker: {name} is shared by several brokers: start this "
            f"one with --shared too"
        )
    if layout is None:
        if client.dbsize():
            raise StoreError(
                f"caps-broker: {name} holds keys that are not a CAPS store; "
                f"give the broker a database of its own"
            )
        client.set(LAYOUT_KEY, LAYOUT)
    elif int(layout) > LAYOUT:
        raise StoreError(
            f"caps-broker: {name} was written by a newer CAPS (layout "
            f"{int(layout)}); this broker reads layout {LAYOUT}"
        )


def _take_lock(client, token, name, wait):
    """
    Take the store's lock, waiting up to C{wait} seconds for it to expire
    if another broker holds it.

    @return: the lock's epoch: how many times a broker has taken it.
    """
    take = client.register_script(_TAKE)
    deadline = time.monotonic() + wait
    while (epoch := take(keys=[LOCK_KEY, EPOCH_KEY], args=[token, LOCK_MS])) is None:
        if time.monotonic() >= deadline:
            holder = client.get(LOCK_KEY)
            holder = holder.decode("utf-8", "replace") if holder else "unknown"
            raise StoreError(
                f"caps-broker: store {name} is in use by another broker ({holder})"
            )
        time.sleep(0.2)
    return epoch


class _WriteCheck:
    """
    What a write checks before it lands, on the writer thread: that this
    broker holds the lock (C{token}), and that Redis has the C{count}
    transactions written to the store so far (C{caps:written}).
    """

    def __init__(self, token, count):
        self.token = token
        self.count = count


def _transaction(scripts, written, changes):
    """
    Write C{changes} (L{layout.BATCH}'s) in one call, if this broker still
    holds the lock and Redis has every transaction written so far: the
    script checks both first, and nothing runs between its check and its
    last change.

    @return: what the script returns (the seqs of a C{removeid}).
    @raise LockLost: if another broker holds the lock.
    @raise DataLost: if Redis has fewer transactions than were written.
    """
    import redis

    try:
        result = scripts.batch(
            keys=[LOCK_KEY, WRITTEN_KEY, WRITER_KEY],
            args=[written.token, written.count, *changes],
        )
    except redis.ResponseError as e:
        why, _, detail = str(e).partition(" ")
        if why == "LOCKLOST":
            raise LockLost(detail) from None
        if why == "DATALOST":
            raise DataLost(
                f"{written.count} transactions written, Redis has {detail}"
            ) from None
        if why == "EXPIRED":
            # Expired while Redis was out of reach: the renewal takes it
            # again if nobody else did, and the write is tried again.
            raise OSError("the store's lock expired; taking it again") from None
        raise
    written.count += 1
    return result


def _write(client, scripts, written, ops, now, durable, replicas):
    """
    Apply a batch of changes (on the writer thread) as one checked
    transaction, and wait for the sync (if C{durable}) and a replica (if
    there are C{replicas}).

    @return: the seconds it took, the durable wait included.
    """
    started = time.perf_counter()
    _transaction(scripts, written, layout.changes(ops, now))
    if durable is not None:
        wait_durable(client, durable, replicas > 0)
    return time.perf_counter() - started


def _remove_id(client, scripts, written, qid, message_id):
    """
    Delete every copy of C{message_id} from queue C{qid} in Redis, as a
    checked transaction; return their sequence numbers.
    """
    removed = _transaction(scripts, written, layout.removal(qid, message_id))
    return [int(seq) for seq in removed]


def _keep(client, renew, args, durable):
    """
    Renew the lock (on the writer thread); with C{durable}, also count the
    primary's replicas.

    @return: C{(ours, replicas)}, C{replicas} L{None} if not counted.
    """
    ours = renew(keys=[LOCK_KEY, EPOCH_KEY], args=args)
    return ours, (_replicas(client) if durable else None)


def wait_durable(client, how, replica):
    timeout = int(DURABLE_TIMEOUT * 1000)
    if how == "waitaof":
        local, replicas = client.execute_command("WAITAOF", 1, int(replica), timeout)
        if local < 1 or replicas < int(replica):
            raise OSError("Redis did not sync the write in time (WAITAOF)")
    elif replica and client.execute_command("WAIT", 1, timeout) < 1:
        raise OSError("no Redis replica took the write in time (WAIT)")
