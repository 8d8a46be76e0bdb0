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

# KEYS: seqs, rows, deliveries, ids.  ARGV: seq, messageId, row, times
# sent, for each message.
ADD = """
for i = 1, #ARGV, 4 do
  local seq, id = ARGV[i], ARGV[i + 1]
  redis.call('ZADD', KEYS[1], seq, seq)
  redis.call('HSET', KEYS[2], seq, ARGV[i + 2])
  if ARGV[i + 3] ~= '0' then
    redis.call('HSET', KEYS[3], seq, ARGV[i + 3])
  end
  local held = redis.call('HGET', KEYS[4], id)
  if held and not string.find(' ' .. held .. ' ', ' ' .. seq .. ' ', 1, true) then
    redis.call('HSET', KEYS[4], id, held .. ' ' .. seq)
  elseif not held then
    redis.call('HSET', KEYS[4], id, seq)
  end
end
return #ARGV / 4
"""

# KEYS: seqs, rows, deliveries, ids.  ARGV: sequence numbers.
REMOVE = """
for i = 1, #ARGV do
  local seq = ARGV[i]
  local row = redis.call('HGET', KEYS[2], seq)
  if row then
    local stop = string.find(row, '\\n', 1, true)
    local id = cjson.decode(string.sub(row, 1, stop - 1))[1]
    local held = redis.call('HGET', KEYS[4], id)
    if held == seq then
      redis.call('HDEL', KEYS[4], id)
    elseif held then
      local rest = {}
      for other in string.gmatch(held, '%S+') do
        if other ~= seq then
          rest[#rest + 1] = other
        end
      end
      if #rest == 0 then
        redis.call('HDEL', KEYS[4], id)
      else
        redis.call('HSET', KEYS[4], id, table.concat(rest, ' '))
      end
    end
    redis.call('HDEL', KEYS[2], seq)
  end
  redis.call('ZREM', KEYS[1], seq)
  redis.call('HDEL', KEYS[3], seq)
end
return #ARGV
"""

# KEYS: seqs, rows, deliveries, ids.  ARGV: messageId.  Removes every copy;
# returns their sequence numbers.
REMOVE_BY_ID = """
local held = redis.call('HGET', KEYS[4], ARGV[1])
if not held then
  return {}
end
redis.call('HDEL', KEYS[4], ARGV[1])
local out = {}
for seq in string.gmatch(held, '%S+') do
  redis.call('HDEL', KEYS[2], seq)
  redis.call('ZREM', KEYS[1], seq)
  redis.call('HDEL', KEYS[3], seq)
  out[#out + 1] = seq
end
return out
"""

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
        self.add = client.register_script(ADD)
        self.remove = client.register_script(REMOVE)
        self.remove_by_id = client.register_script(REMOVE_BY_ID)
        self.read = client.register_script(READ)


def write(pipe, scripts, ops, now):
    """
    Queue a batch of changes, as L{caps.store.batch.coalesce} reduces them,
    on C{pipe} (a transaction, executed by the caller), and the forgetting
    of the dedupe ids expired by C{now}.

    @param scripts: the L{Scripts} of the client.
    """
    for op, rows in coalesce(ops):
        _WRITERS[op](pipe, scripts, rows)
    pipe.zremrangebyscore(DEDUPE_KEY, "-inf", now)


def _by_queue(rows, qid_at):
    grouped = {}
    for row in rows:
        grouped.setdefault(row[qid_at], []).append(row)
    return grouped.items()


def _save_queue(pipe, scripts, rows):
    for qid, client_id, event, subscribed, flt, max_length in rows:
        fields = [client_id, event, bool(subscribed), flt, max_length]
        pipe.hset(QUEUES_KEY, qid, json.dumps(fields))


def _drop_entries(pipe, scripts, rows):
    for (qid,) in rows:
        pipe.delete(*keys(qid))


def _drop_queue(pipe, scripts, rows):
    for (qid,) in rows:
        pipe.hdel(QUEUES_KEY, qid)


def _add_entries(pipe, scripts, rows):
    for qid, entries in _by_queue(rows, 0):
        args = []
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
            args += (
                seq,
                message_id,
                row(message_id, event, payload, time_, expires, reason, died),
                sent,
            )
        scripts.add(keys=keys(qid), args=args, client=pipe)


def _delivered(pipe, scripts, rows):
    for qid, updates in _by_queue(rows, 1):
        pipe.hset(keys(qid)[2], mapping={seq: count for count, _, seq in updates})


def _remove_entries(pipe, scripts, rows):
    for qid, removed in _by_queue(rows, 0):
        scripts.remove(keys=keys(qid), args=[seq for _, seq in removed], client=pipe)


def _remember(pipe, scripts, rows):
    pipe.zadd(DEDUPE_KEY, dict(rows))


# The SQLite store's statements name the kinds of change (they are what
# caps.store.batch folds); here each kind is written as Redis commands.
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
