"""
How the Redis store lays the broker's state out in Redis: the keys, a
message's row, the Lua scripts that change or read several keys of a
queue at once, and a batch of changes as Redis commands.

Every key of one queue carries the hash tag C{{q<qid>}}, so Redis Cluster
keeps a queue's keys in one slot and a script can change them together.

    caps:layout                 the layout's version (LAYOUT)
    caps:lock                   the token of the broker using the store
    caps:queues                 hash: qid -> [clientId, event, subscribed, filter, maxLength]
    caps:dedupe                 sorted set: client-given messageId, scored by when it may be forgotten
    caps:{q<qid>}:seqs          sorted set: the queue's sequence numbers, in order
    caps:{q<qid>}:rows          hash: seq -> the message (see L{row})
    caps:{q<qid>}:deliveries    hash: seq -> times sent, once sent
    caps:{q<qid>}:ids           hash: messageId -> seq (acknowledging a message in the store only)
"""

import json

from caps.queue import Message
from caps.store.batch import coalesce
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

LAYOUT = 1
LAYOUT_KEY = "caps:layout"
LOCK_KEY = "caps:lock"
QUEUES_KEY = "caps:queues"
DEDUPE_KEY = "caps:dedupe"


def keys(qid):
    tag = f"caps:{{q{qid}}}"
    return (f"{tag}:seqs", f"{tag}:rows", f"{tag}:deliveries", f"{tag}:ids")


def row(message_id, event, payload, time_, expires, reason, died):
    """
    A message as the store keeps it: a JSON header, a newline, the payload
    (compact JSON, so it has no raw newline of its own).
    """
    header = json.dumps(
        [message_id, event, time_, expires, reason, died], separators=(",", ":")
    )
    return header.encode("utf-8") + b"\n" + payload


def message(seq, row, deliveries):
    header, _, payload = row.partition(b"\n")
    message_id, event, time_, expires, reason, died = json.loads(header)
    return (
        Message(message_id, event, payload, seq, time_, expires),
        int(deliveries or 0),
        None if reason is None else (reason, died),
    )


# The ids hash maps a messageId to the sequence numbers of its copies in
# the queue, space-separated: usually one; two when it was published again
# after the dedupe window while the first copy was still queued.
#
# BATCH writes a whole batch of changes in one call, once it has checked
# that this broker holds the lock and that Redis has every transaction
# written so far (one round trip, and atomic: nothing else runs between the
# check and the last change).  KEYS: the lock, the written count, the
# token of the broker that wrote last.  ARGV:
# the token, the count, then each change as its kind, how many arguments
# follow, and those:
#   call N COMMAND ARG...                   a Redis command
#   add N SEQS ROWS DELIVERIES IDS (SEQ ID ROW SENT)...
#   remove N SEQS ROWS DELIVERIES IDS (SEQ ID)...
#   removeid 5 SEQS ROWS DELIVERIES IDS MESSAGEID   (its seqs are returned)
# A failed check is an error reply: LOCKLOST <holder>, EXPIRED, or
# DATALOST <count>.
# Forget one copy (seq) of a messageId in an ids hash (Lua, shared with
# caps.store.sharedlayout).
FORGET = """
local function forget(ids, id, seq)
  local held = redis.call('HGET', ids, id)
  if held == seq then
    redis.call('HDEL', ids, id)
  elseif held then
    local rest = {}
    for other in string.gmatch(held, '%S+') do
      if other ~= seq then
        rest[#rest + 1] = other
      end
    end
    if #rest == 0 then
      redis.call('HDEL', ids, id)
    else
      redis.call('HSET', ids, id, table.concat(rest, ' '))
    end
  end
end
"""

BATCH = (
    FORGET
    + """
local function add(seqs, rows, deliveries, ids, first, last)
  for i = first, last, 4 do
    local seq, id = ARGV[i], ARGV[i + 1]
    redis.call('ZADD', seqs, seq, seq)
    redis.call('HSET', rows, seq, ARGV[i + 2])
    if ARGV[i + 3] ~= '0' then
      redis.call('HSET', deliveries, seq, ARGV[i + 3])
    end
    local held = redis.call('HGET', ids, id)
    if not held then
      redis.call('HSET', ids, id, seq)
    elseif not string.find(' ' .. held .. ' ', ' ' .. seq .. ' ', 1, true) then
      redis.call('HSET', ids, id, held .. ' ' .. seq)
    end
  end
end

local function remove(seqs, rows, deliveries, ids, first, last)
  for i = first, last, 2 do
    local seq = ARGV[i]
    if redis.call('HDEL', rows, seq) == 1 then
      forget(ids, ARGV[i + 1], seq)
    end
    redis.call('ZREM', seqs, seq)
    redis.call('HDEL', deliveries, seq)
  end
end

local function remove_id(seqs, rows, deliveries, ids, id)
  local held = redis.call('HGET', ids, id)
  local out = {}
  if held then
    redis.call('HDEL', ids, id)
    for seq in string.gmatch(held, '%S+') do
      redis.call('HDEL', rows, seq)
      redis.call('ZREM', seqs, seq)
      redis.call('HDEL', deliveries, seq)
      out[#out + 1] = seq
    end
  end
  return out
end

local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if not holder then
    return redis.error_reply('EXPIRED the lock expired')
  end
  return redis.error_reply('LOCKLOST ' .. holder)
end
local count = redis.call('GET', KEYS[2]) or '0'
if count ~= ARGV[2] then
  -- One more than this broker counts, written by it: its last batch
  -- landed but the answer was lost.  This one holds those changes again
  -- (they are kept until confirmed), and writing them twice is harmless.
  if tonumber(count) ~= tonumber(ARGV[2]) + 1
      or redis.call('GET', KEYS[3]) ~= ARGV[1] then
    return redis.error_reply('DATALOST ' .. count)
  end
end
local out = {}
local i = 3
while i <= #ARGV do
  local kind, n = ARGV[i], tonumber(ARGV[i + 1])
  local first, last = i + 2, i + 1 + n
  if kind == 'call' then
    local command = {}
    for j = first, last do
      command[#command + 1] = ARGV[j]
    end
    redis.call(unpack(command))
  elseif kind == 'add' then
    add(ARGV[first], ARGV[first + 1], ARGV[first + 2], ARGV[first + 3], first + 4, last)
  elseif kind == 'remove' then
    remove(ARGV[first], ARGV[first + 1], ARGV[first + 2], ARGV[first + 3], first + 4, last)
  elseif kind == 'removeid' then
    out = remove_id(ARGV[first], ARGV[first + 1], ARGV[first + 2], ARGV[first + 3], ARGV[last])
  else
    return redis.error_reply('BADBATCH unknown change ' .. kind)
  end
  i = last + 1
end
redis.call('SET', KEYS[2], tonumber(ARGV[2]) + 1)
redis.call('SET', KEYS[3], ARGV[1])
return out
"""
)

# KEYS: seqs, rows, deliveries.  ARGV: after, limit.  Returns seq, row,
# deliveries for each message, flat, in order.
READ = """
local seqs = redis.call('ZRANGE', KEYS[1], '(' .. ARGV[1], '+inf', 'BYSCORE',
                        'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for i = 1, #seqs do
  local seq = seqs[i]
  out[#out + 1] = seq
  out[#out + 1] = redis.call('HGET', KEYS[2], seq) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], seq) or '0'
end
return out
"""


def read_entries(client, scripts, qid, after, limit):
    """
    Up to C{limit} messages of queue C{qid} after sequence number C{after},
    in order: C{(Message, deliveries, dead)}.
    """
    seqs, rows, deliveries, _ = keys(qid)
    flat = scripts.read(
        keys=[seqs, rows, deliveries], args=[after, limit], client=client
    )
    return [
        message(int(flat[i]), flat[i + 1], flat[i + 2])
        for i in range(0, len(flat), 3)
        if flat[i + 1]
    ]


class Scripts:
    """
    The Lua scripts above, registered with a client.
    """

    def __init__(self, client):
        self.batch = client.register_script(BATCH)
        self.read = client.register_script(READ)


# Commands in one "call" change at the most: Lua's unpack() has a limit.
CHUNK = 500


def changes(ops, now):
    """
    A batch of changes, as L{caps.store.batch.coalesce} reduces them, and
    the forgetting of the dedupe ids expired by C{now}, as L{BATCH}'s
    arguments after the token and the count.
    """
    args = []
    for op, rows in coalesce(ops):
        _WRITERS[op](args, rows)
    _call(args, "ZREMRANGEBYSCORE", DEDUPE_KEY, "-inf", now)
    return args


def removal(qid, message_id):
    """
    The L{BATCH} arguments that delete every copy of C{message_id} from
    queue C{qid}.
    """
    return ["removeid", 5, *keys(qid), message_id]


def _call(args, *command):
    args += ("call", len(command), *command)


def _by_queue(rows, qid_at):
    grouped = {}
    for row in rows:
        grouped.setdefault(row[qid_at], []).append(row)
    return grouped.items()


def _save_queue(args, rows):
    for qid, client_id, event, subscribed, flt, max_length in rows:
        fields = [client_id, event, bool(subscribed), flt, max_length]
        _call(args, "HSET", QUEUES_KEY, qid, json.dumps(fields))


def _drop_entries(args, rows):
    for (qid,) in rows:
        _call(args, "DEL", *keys(qid))


def _drop_queue(args, rows):
    for (qid,) in rows:
        _call(args, "HDEL", QUEUES_KEY, qid)


def _add_entries(args, rows):
    for qid, entries in _by_queue(rows, 0):
        added = []
        for (
            _,
            seq,
            message_id,
            event,
            payload,
            time_,
            expires,
            sent,
            reason,
            died,
        ) in entries:
            added += (
                seq,
                message_id,
                row(message_id, event, payload, time_, expires, reason, died),
                sent,
            )
        args += ("add", 4 + len(added), *keys(qid), *added)


def _delivered(args, rows):
    for qid, updates in _by_queue(rows, 1):
        fields = [value for count, _, seq in updates for value in (seq, count)]
        for start in range(0, len(fields), 2 * CHUNK):
            _call(args, "HSET", keys(qid)[2], *fields[start : start + 2 * CHUNK])


def _remove_entries(args, rows):
    for qid, removed in _by_queue(rows, 0):
        pairs = [value for _, seq, message_id in removed for value in (seq, message_id)]
        args += ("remove", 4 + len(pairs), *keys(qid), *pairs)


def _remember(args, rows):
    fields = [value for message_id, expires in rows for value in (expires, message_id)]
    for start in range(0, len(fields), 2 * CHUNK):
        _call(args, "ZADD", DEDUPE_KEY, *fields[start : start + 2 * CHUNK])


# The SQLite store's statements name the kinds of change (they are what
# caps.store.batch folds); here each kind becomes changes for BATCH.
_WRITERS = {
    SAVE_QUEUE: _save_queue,
    DROP_ENTRIES: _drop_entries,
    DROP_QUEUE: _drop_queue,
    ADD_ENTRY: _add_entries,
    MOVE_ENTRY: _add_entries,
    DELIVERED: _delivered,
    REMOVE_ENTRY: _remove_entries,
    REMEMBER_ID: _remember,
}
