"""
The Redis store: the broker's state in a Redis database.

The same contract as the SQLite store (L{caps.store.IStore}): the broker
keeps its queues in memory, each queue's first C{window} messages, and
records every change; the changes of one pass of the reactor go to Redis
in one C{MULTI}/C{EXEC} on the writer thread (L{caps.store.group}), and a
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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet import task
from zope.interface import implementer

from caps.queue import Queue
from caps.store import UNAVAILABLE, IStore, State, StoreError, StoreUnavailable
from caps.store import redislayout as layout
from caps.store.group import GroupCommit
from caps.store.redislayout import DEDUPE_KEY, LAYOUT, LAYOUT_KEY, LOCK_KEY, QUEUES_KEY
from caps.store.schema import (
    ADD_ENTRY,
    DELIVERED,
    DROP_ENTRIES,
    DROP_QUEUE,
    MOVE_ENTRY,
    REMEMBER_ID,
    REMOVE_ENTRY,
    SAVE_QUEUE,
)

# The password, when the URL has none: never on the command line.
PASSWORD_ENV = "CAPS_REDIS_PASSWORD"
# Messages of each queue kept in memory, as with SQLite.
WINDOW = 10_000
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
SENTINEL = "redis+sentinel"
SCHEMES = ("redis", "rediss", "unix", SENTINEL)

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


def shown(url):
    """
    C{url} without its password (in the user part or a C{password=}
    query parameter), for logs and errors.
    """
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        hidden = [(n, "***" if n == "password" else v) for n, v in query]
        parts = parts._replace(query=urlencode(hidden, safe="*"))
    return urlunsplit(parts)


def connect(url):
    """
    A redis-py client for C{url}; the password from C{$CAPS_REDIS_PASSWORD}
    if the URL has none.  A C{redis+sentinel://} URL names Sentinels and a
    service; the client asks them for the primary, and again after a
    failover.

    @raise StoreError: if the URL is not one Redis takes, or redis-py is
        not installed.
    """
    try:
        import redis
    except ImportError:
        raise StoreError(
            "caps-broker: --store redis:// needs the redis package "
            "(pip install 'caps-broker[redis]')"
        ) from None
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise StoreError(f"caps-broker: not a Redis URL: {shown(url)}")
    options = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0}
    userinfo, at, hosts = parts.netloc.rpartition("@")
    in_url = (at and ":" in userinfo) or "password=" in parts.query
    password = os.environ.get(PASSWORD_ENV)
    if password and not in_url:
        options["password"] = password
    try:
        if parts.scheme == SENTINEL:
            return _sentinel_client(parts, options)
        return redis.Redis.from_url(url, **options)
    except ValueError as e:
        raise StoreError(f"caps-broker: bad Redis URL {shown(url)}: {e}") from None


def _sentinel_client(parts, options):
    """
    The client of the primary that Sentinels watch, from
    C{redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]}:
    the password is the primary's (the Sentinels take none here).
    """
    from redis.sentinel import Sentinel

    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = user
        if password:
            options["password"] = password
    sentinels = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"not HOST:PORT: {address!r}")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = parts.path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ValueError("the path must be /SERVICE or /SERVICE/DB")
    watchers = Sentinel(
        sentinels,
        sentinel_kwargs={"socket_timeout": options["socket_timeout"]},
        socket_timeout=options["socket_timeout"],
        socket_connect_timeout=options["socket_connect_timeout"],
    )
    return watchers.master_for(service, db=int(db or 0), **options)


def _version(client):
    text = client.info("server").get("redis_version", "0")
    return tuple(int(part) for part in str(text).split(".")[:2] if part.isdigit())


def _check_durable(client, name):
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
    if _version(client) >= (7, 2):
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
class RedisStore(GroupCommit):
    """
    The broker's state in a Redis database, written in groups by one
    writer thread.

    @ivar durable: how confirmed writes wait beyond Redis accepting them:
        L{None}, C{"waitaof"} or C{"always"} (see L{_check_durable}).
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
        # (see _Written).
        token, self._epoch, written = lease
        self._token = token
        self._check = _Written(token, written)
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
        import redis

        name = shown(url)
        client = connect(url)
        token = f"{uuid.uuid4().hex} pid {os.getpid()}"
        if lock_wait is None:
            lock_wait = LOCK_TTL + 1.0
        try:
            if _version(client) < (6, 2):
                raise StoreError(f"caps-broker: {name} runs a Redis older than 6.2")
            _check_layout(client, name)
            how = _check_durable(client, name) if durable else None
            epoch = _take_lock(client, token, name, lock_wait)
            written = int(client.get(WRITTEN_KEY) or 0)
        except redis.RedisError as e:
            client.close()
            raise StoreError(f"caps-broker: cannot open store {name}: {e}") from None
        except StoreError:
            client.close()
            raise
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
        for qid, queue in queues.items():
            seqs = layout.keys(qid)[0]
            count = client.zcard(seqs)
            if not count:
                continue
            last = client.zrange(seqs, -1, -1)
            state.seq = max(state.seq, int(last[0]))
            rows = layout.read_entries(client, self._scripts, qid, 0, self.window)
            for message, deliveries, dead in rows:
                if message.id in queue:
                    # Published again after the dedupe window while the
                    # first was in the store only: the later one is a
                    # duplicate.
                    self._record(REMOVE_ENTRY, (qid, message.seq))
                    continue
                queue.append(message, deliveries, dead)
                live[message.id] = live.get(message.id, 0) + 1
            if rows:
                queue.last_seq = rows[-1][0].seq
            queue.spilled = count - len(rows)
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

    def queue_dropped(self, queue):
        self._record(DROP_ENTRIES, (queue.qid,))
        self._record(DROP_QUEUE, (queue.qid,))

    def message_added(self, message, queues):
        for queue in queues:
            self._record(ADD_ENTRY, _params(queue, message, 0))

    def entry_removed(self, queue, message):
        self._record(REMOVE_ENTRY, (queue.qid, message.seq))

    def entry_added(self, queue, entry):
        self._record(
            MOVE_ENTRY, _params(queue, entry.message, entry.deliveries, entry.dead)
        )

    def delivered(self, entry):
        self._record(DELIVERED, (entry.deliveries, entry.queue.qid, entry.message.seq))

    def id_remembered(self, message_id, expires):
        self._record(REMEMBER_ID, (message_id, expires))

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


def _params(queue, message, deliveries, dead=None):
    reason, died = dead or (None, None)
    return (
        queue.qid,
        message.seq,
        message.id,
        message.event,
        message.payload,
        message.time,
        message.expires,
        deliveries,
        reason,
        died,
    )


def _check_layout(client, name):
    layout = client.get(LAYOUT_KEY)
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


class _Written:
    """
    What a write checks before it lands, on the writer thread: that this
    broker holds the lock (C{token}), and that Redis has the C{count}
    transactions written to the store so far (C{caps:written}).
    """

    def __init__(self, token, count):
        self.token = token.encode("utf-8")
        self.count = count


def _transaction(client, written, fill):
    """
    Run the commands C{fill(pipe)} queues as one transaction, if this broker
    still holds the lock and Redis has every transaction written so far;
    both are checked under C{WATCH}, so a broker that takes the lock between
    the check and the write makes the write fail, not land.

    @return: the results of the commands.
    @raise LockLost: if another broker holds the lock.
    @raise DataLost: if Redis has fewer transactions than were written.
    """
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(LOCK_KEY, WRITTEN_KEY)
        holder, count = pipe.mget(LOCK_KEY, WRITTEN_KEY)
        if holder != written.token:
            if holder is None:
                # Expired while Redis was out of reach: the renewal takes it
                # again if nobody else did, and the write is tried again.
                raise OSError("the store's lock expired; taking it again")
            raise LockLost(holder.decode("utf-8", "replace"))
        if int(count or 0) != written.count:
            raise DataLost(f"{written.count} transactions written, Redis has {count}")
        pipe.multi()
        fill(pipe)
        pipe.incr(WRITTEN_KEY)
        results = pipe.execute()
    written.count += 1
    return results[:-1]


def _write(client, scripts, written, ops, now, durable, replicas):
    """
    Apply a batch of changes (on the writer thread) as one checked
    transaction, and wait for the sync (if C{durable}) and a replica (if
    there are C{replicas}).

    @return: the seconds it took, the durable wait included.
    """
    started = time.perf_counter()
    _transaction(client, written, lambda pipe: layout.write(pipe, scripts, ops, now))
    if durable is not None:
        _wait_durable(client, durable, replicas > 0)
    return time.perf_counter() - started


def _remove_id(client, scripts, written, qid, message_id):
    """
    Delete every copy of C{message_id} from queue C{qid} in Redis, as a
    checked transaction; return their sequence numbers.
    """
    (removed,) = _transaction(
        client,
        written,
        lambda pipe: scripts.remove_by_id(
            keys=layout.keys(qid), args=[message_id], client=pipe
        ),
    )
    return [int(seq) for seq in removed]


def _keep(client, renew, args, durable):
    """
    Renew the lock (on the writer thread); with C{durable}, also count the
    primary's replicas.

    @return: C{(ours, replicas)}, C{replicas} L{None} if not counted.
    """
    ours = renew(keys=[LOCK_KEY, EPOCH_KEY], args=args)
    return ours, (_replicas(client) if durable else None)


def _wait_durable(client, how, replica):
    timeout = int(DURABLE_TIMEOUT * 1000)
    if how == "waitaof":
        local, replicas = client.execute_command("WAITAOF", 1, int(replica), timeout)
        if local < 1 or replicas < int(replica):
            raise OSError("Redis did not sync the write in time (WAITAOF)")
    elif replica and client.execute_command("WAIT", 1, timeout) < 1:
        raise OSError("no Redis replica took the write in time (WAIT)")
