"""
How brokers sharing one Redis lay their state out in it (C{--shared}), and
the Lua scripts that change it.  Redis decides, atomically, everything two
brokers could disagree on: whether a publish is a duplicate or overflows a
queue, its sequence number, which broker holds a message in flight, and
when a message dies.  Each broker keeps in memory only the messages it has
claimed for its own connections.

A queue's id is derived from (clientId, event) (L{qid}, and C{qid_of} in
the scripts), so every broker names a queue the same way without asking
Redis.  Every key of one queue carries the hash tag C{{q<qid>}}.

    caps:layout                    "shared-1"
    caps:s:queues                  hash: qid -> [clientId, event, subscribed, filter, maxLength]
    caps:s:subs                    counter: bumped by every subscription change
    caps:s:seq                     counter: the last message sequence number
    caps:s:dedupe                  sorted set: client-given messageId, scored by when it may be forgotten
    caps:s:live                    hash: messageId -> how many queues hold it
    caps:s:expiring                set: qids that may hold messages with a TTL
    caps:s:brokers                 hash: broker id -> its description
    caps:s:alive:<broker>          string, expiring: the broker's heartbeat
    caps:s:claims:<broker>         set: qids in which the broker holds messages
    caps:s:lapses                  hash: broker id -> times it was given up for dead
    caps:s:{q<qid>}:rows           hash: seq -> the message (L{caps.store.redislayout.row})
    caps:s:{q<qid>}:ready          sorted set: seqs waiting for a consumer, in order
    caps:s:{q<qid>}:owned          hash: seq -> broker holding it in flight
    caps:s:{q<qid>}:deliveries     hash: seq -> times sent, once sent
    caps:s:{q<qid>}:ids            hash: messageId -> the seqs of its copies

Brokers hear of changes on one pub/sub channel, C{caps:s:events}:
C{ready <qid>...} (messages became ready), C{subs} (a subscription
changed), C{gone <broker> <qid> <messageId>} (a message that broker holds
was acknowledged through another).
"""

import functools
import hashlib

from caps.frames import DEAD_SUFFIX
from caps.store.redislayout import FORGET

LAYOUT = "shared-1"
PREFIX = "caps:s:"
QUEUES_KEY = PREFIX + "queues"
SUBS_KEY = PREFIX + "subs"
SEQ_KEY = PREFIX + "seq"
BROKERS_KEY = PREFIX + "brokers"
CHANNEL = PREFIX + "events"
# Milliseconds a broker's heartbeat lasts unless renewed (every second):
# the others give its messages back once it has lapsed.
ALIVE_MS = 5000


@functools.lru_cache(maxsize=65536)
def qid(client_id, event):
    """
    The id of the queue (clientId, event), the same on every broker.
    """
    name = f"{client_id}\0{event}".encode("utf-8", "surrogatepass")
    return hashlib.sha1(name).hexdigest()[:16]


def dead_qid(client_id, event):
    return qid(client_id, event + DEAD_SUFFIX)


# Functions every script starts with.
_PRELUDE = (
    r"""
local P = 'caps:s:'
local NOTIFY = {}

local function qkeys(qid)
  local t = P .. '{q' .. qid .. '}:'
  return t .. 'ready', t .. 'rows', t .. 'owned', t .. 'deliveries', t .. 'ids'
end

local function qid_of(client, event)
  return string.sub(redis.sha1hex(client .. '\0' .. event), 1, 16)
end

local function is_dead(event)
  return string.sub(event, -5) == '.dead'
end

-- The queue's clientId, event and maxLength (false if none), creating its
-- record (not subscribed) if it has none.
local function ensure(client, event)
  local qid = qid_of(client, event)
  local meta = redis.call('HGET', P .. 'queues', qid)
  if not meta then
    redis.call('HSET', P .. 'queues', qid,
      '[' .. cjson.encode(client) .. ',' .. cjson.encode(event) .. ',false,null,null]')
    return qid, false
  end
  local m = cjson.decode(meta)
  if m[5] == cjson.null then
    return qid, false
  end
  return qid, m[5]
end

local function meta_of(qid)
  local meta = redis.call('HGET', P .. 'queues', qid)
  if not meta then
    return nil
  end
  return cjson.decode(meta)
end

local function add_id(ids, id, seq)
  local held = redis.call('HGET', ids, id)
  if not held then
    redis.call('HSET', ids, id, seq)
  else
    redis.call('HSET', ids, id, held .. ' ' .. seq)
  end
end

"""
    + FORGET
    + r"""

local function unlive(id, n)
  if redis.call('HINCRBY', P .. 'live', id, -n) <= 0 then
    redis.call('HDEL', P .. 'live', id)
  end
end

local function header(row)
  local nl = string.find(row, '\n', 1, true)
  return string.sub(row, 1, nl - 1), string.sub(row, nl)
end

local function message_id(row)
  return cjson.decode((header(row)))[1]
end

-- When the message expires, or nil.
local function expiry(row)
  local head = header(row)
  if string.sub(head, -16) == ',null,null,null]' then
    return nil
  end
  local e = cjson.decode(head)[4]
  if e == cjson.null then
    return nil
  end
  return e
end

-- Why a message of a live queue must go to the dead letters now (sent
-- MOST times, or expired by NOW), or nil.
local function due(row, sent, now, most)
  if sent >= most then
    return 'max-deliveries'
  end
  local e = row and expiry(row)
  if e and e <= now then
    return 'expired'
  end
  return nil
end

-- Take a message out of a queue's keys; returns its row.
local function take(qid, seq)
  local ready, rows, owned, deliveries, ids = qkeys(qid)
  local row = redis.call('HGET', rows, seq)
  if not row then
    return nil
  end
  redis.call('HDEL', rows, seq)
  redis.call('ZREM', ready, seq)
  redis.call('HDEL', owned, seq)
  redis.call('HDEL', deliveries, seq)
  forget(ids, message_id(row), seq)
  return row
end

-- Put a message in a queue, ready, at its place.
local function put(qid, seq, row, sent)
  local ready, rows, owned, deliveries, ids = qkeys(qid)
  redis.call('HSET', rows, seq, row)
  redis.call('ZADD', ready, seq, seq)
  if sent > 0 then
    redis.call('HSET', deliveries, seq, sent)
  end
  add_id(ids, message_id(row), seq)
  if expiry(row) then
    redis.call('SADD', P .. 'expiring', qid)
  end
  NOTIFY[qid] = true
end

-- Move a message of the queue (client, event) to its dead letters, saying
-- why and when.
local function to_dead(qid, client, event, seq, reason, now)
  local sent = tonumber(redis.call('HGET', select(4, qkeys(qid)), seq) or '0')
  local row = take(qid, seq)
  if not row then
    return
  end
  local head, rest = header(row)
  head = string.match(head, '^(.*),[^,]*,[^,]*%]$') .. ',' .. cjson.encode(reason) .. ',' .. now .. ']'
  local dead = ensure(client, event .. '.dead')
  put(dead, seq, head .. rest, sent)
end

-- Put every message BROKER holds back in its queue, ready; forget its
-- claims.  Returns how many.
local function give_back_all(broker)
  local returned = 0
  for _, qid in ipairs(redis.call('SMEMBERS', P .. 'claims:' .. broker)) do
    local ready, rows, owned = qkeys(qid)
    local held = redis.call('HGETALL', owned)
    for i = 1, #held, 2 do
      if held[i + 1] == broker then
        redis.call('HDEL', owned, held[i])
        redis.call('ZADD', ready, held[i], held[i])
        NOTIFY[qid] = true
        returned = returned + 1
      end
    end
  end
  redis.call('DEL', P .. 'claims:' .. broker)
  return returned
end

-- Append the queues that got ready messages to OUT, and announce them.
local function notified(out)
  local qids = {}
  for qid in pairs(NOTIFY) do
    qids[#qids + 1] = qid
    out[#out + 1] = qid
  end
  if #qids > 0 then
    redis.call('PUBLISH', P .. 'events', 'ready ' .. table.concat(qids, ' '))
  end
  return out
end
"""
)

# ARGV: the subscriptions version the brokers routed with, now, the
# broker's messageId prefix, its queue limit; then, for each message: its
# messageId (JSON) or '', when a client-given id may be forgotten, its
# event, the rest of its row's header after the messageId, its payload,
# how many clientIds it is addressed to, those clientIds, how many
# subscribed queues it matched, their qids.  Returns one answer for each
# message, in order: {'stale'}, {'duplicate', id}, {'full', clientId,
# event, count, limit} or {'ok', id, seq, queues}.  Each message is stored
# whole or not at all; one refused does not stop the next.
PUBLISH = (
    _PRELUDE
    + r"""
local stale = (redis.call('GET', P .. 'subs') or '0') ~= ARGV[1]
local now = tonumber(ARGV[2])
local prefix = ARGV[3]
local maxq = tonumber(ARGV[4])
local forgotten = false

local function publish(i)
  local id, event, rest, body = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local n = tonumber(ARGV[i + 5])
  local first_to, last_to = i + 6, i + 5 + n
  local m_count = tonumber(ARGV[last_to + 1])
  local first_m, last_m = last_to + 2, last_to + 1 + m_count
  local after = last_m + 1
  if stale then
    return {'stale'}, after
  end
  if id ~= '' then
    if not forgotten then
      redis.call('ZREMRANGEBYSCORE', P .. 'dedupe', '-inf', now)
      forgotten = true
    end
    local plain = cjson.decode(id)
    if redis.call('ZSCORE', P .. 'dedupe', plain)
        or redis.call('HEXISTS', P .. 'live', plain) == 1 then
      return {'duplicate', plain}, after
    end
  end
  local targets, seen, missing = {}, {}, {}
  local function check(qid, client, ev, m)
    if seen[qid] then
      return nil
    end
    seen[qid] = true
    local limit = maxq
    if m and m[5] ~= cjson.null and m[5] < limit then
      limit = m[5]
    end
    local count = redis.call('HLEN', P .. '{q' .. qid .. '}:rows')
    if count >= limit then
      return {'full', client, ev, count, limit}
    end
    targets[#targets + 1] = qid
    return nil
  end
  for k = first_to, last_to do
    local qid = qid_of(ARGV[k], event)
    local m = meta_of(qid)
    if not m then
      missing[#missing + 1] = {qid, ARGV[k]}
    end
    local full = check(qid, ARGV[k], event, m)
    if full then
      return full, after
    end
  end
  for k = first_m, last_m do
    local m = meta_of(ARGV[k])
    if m then
      local full = check(ARGV[k], m[1], m[2], m)
      if full then
        return full, after
      end
    end
  end
  for _, queue in ipairs(missing) do
    redis.call('HSETNX', P .. 'queues', queue[1],
      '[' .. cjson.encode(queue[2]) .. ',' .. cjson.encode(event) .. ',false,null,null]')
  end
  local seq = redis.call('INCR', P .. 'seq')
  local plain
  if id == '' then
    plain = prefix .. seq
    -- A client may have taken this id for one of its own: make another.
    local n = 0
    while redis.call('HEXISTS', P .. 'live', plain) == 1
        or redis.call('ZSCORE', P .. 'dedupe', plain) do
      n = n + 1
      plain = prefix .. seq .. '.' .. n
    end
    id = '"' .. plain .. '"'
  else
    plain = cjson.decode(id)
    redis.call('ZADD', P .. 'dedupe', ARGV[i + 1], plain)
  end
  local row = '[' .. id .. rest .. '\n' .. body
  local expiring = string.sub(rest, -16) ~= ',null,null,null]'
  for _, qid in ipairs(targets) do
    local ready, rows, owned, deliveries, ids = qkeys(qid)
    redis.call('HSET', rows, seq, row)
    redis.call('ZADD', ready, seq, seq)
    if redis.call('HSETNX', ids, plain, seq) == 0 then
      add_id(ids, plain, seq)
    end
    if expiring then
      redis.call('SADD', P .. 'expiring', qid)
    end
  end
  if #targets > 0 then
    redis.call('HINCRBY', P .. 'live', plain, #targets)
  end
  return {'ok', plain, seq, #targets}, after
end

local out = {}
local i = 5
while i <= #ARGV do
  out[#out + 1], i = publish(i)
end
return out
"""
)

# ARGV: qid, broker, how many, now, max deliveries, the last seq to claim
# ('' for any, 'now' for the last one published so far), is the queue
# dead letters ('1'/'0').  Claims the oldest ready messages for the
# broker; those delivered too often or expired go to the dead letters on
# the way.  Returns {until, count, (seq, row, deliveries)..., qid...}: the
# qids are queues that got ready messages (dead letters).
CLAIM = (
    _PRELUDE
    + r"""
local qid, broker, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, most = tonumber(ARGV[4]), tonumber(ARGV[5])
local upto = ARGV[6]
if upto == 'now' then
  upto = redis.call('GET', P .. 'seq') or '0'
end
local stop = upto
if stop == '' then
  stop = '+inf'
end
local dead = ARGV[7] == '1'
if redis.call('EXISTS', P .. 'alive:' .. broker) == 0 then
  -- Given up for dead (its heartbeat lapsed): it claims again once it
  -- has beaten, and forgotten what it held.
  return redis.error_reply('REAPED ' .. broker)
end
local ready, rows, owned, deliveries = qkeys(qid)
local out = {upto, 0}
local got = 0
local m = nil
while got < want do
  local seqs = redis.call('ZRANGE', ready, '-inf', stop, 'BYSCORE', 'LIMIT', 0, want - got)
  if #seqs == 0 then
    break
  end
  redis.call('ZREM', ready, unpack(seqs))
  local found = redis.call('HMGET', rows, unpack(seqs))
  local counts = redis.call('HMGET', deliveries, unpack(seqs))
  local holders, sends = {}, {}
  for i, seq in ipairs(seqs) do
    local row = found[i]
    if row then
      local sent = tonumber(counts[i] or '0')
      local reason = nil
      if not dead then
        reason = due(row, sent, now, most)
      end
      if reason then
        m = m or meta_of(qid)
        to_dead(qid, m[1], m[2], seq, reason, now)
      else
        holders[#holders + 1] = seq
        holders[#holders + 1] = broker
        sends[#sends + 1] = seq
        sends[#sends + 1] = sent + 1
        out[#out + 1] = seq
        out[#out + 1] = row
        out[#out + 1] = sent + 1
        got = got + 1
      end
    end
  end
  if #holders > 0 then
    redis.call('HSET', owned, unpack(holders))
    redis.call('HSET', deliveries, unpack(sends))
  end
end
if got > 0 then
  redis.call('SADD', P .. 'claims:' .. broker, qid)
end
out[2] = got
return notified(out)
"""
)

# ARGV: broker, now, max deliveries, then (qid, seq, unsent) for each
# message the broker gives back: each goes back to its place, ready, unless
# it was delivered too often or has expired (then to the dead letters);
# one claimed but never sent (unsent '1') has its claim's count taken
# back.  Returns the qids that
# got ready messages.
GIVE = (
    _PRELUDE
    + r"""
local broker, now, most = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local metas = {}
for i = 4, #ARGV, 3 do
  local qid, seq = ARGV[i], ARGV[i + 1]
  local ready, rows, owned, deliveries = qkeys(qid)
  if redis.call('HGET', owned, seq) == broker then
    redis.call('HDEL', owned, seq)
    if ARGV[i + 2] == '1' then
      -- Claimed, never sent: the claim's count is taken back.
      if redis.call('HINCRBY', deliveries, seq, -1) <= 0 then
        redis.call('HDEL', deliveries, seq)
      end
    end
    local m = metas[qid] or meta_of(qid)
    metas[qid] = m
    local reason = nil
    if m and not is_dead(m[2]) then
      reason = due(
        redis.call('HGET', rows, seq),
        tonumber(redis.call('HGET', deliveries, seq) or '0'),
        now,
        most
      )
    end
    if reason then
      to_dead(qid, m[1], m[2], seq, reason, now)
    else
      redis.call('ZADD', ready, seq, seq)
      NOTIFY[qid] = true
    end
  end
end
return notified({})
"""
)

# ARGV: broker, then (qid, the qid of its dead letters or '', messageId)
# for each message acknowledged.  Deletes every copy of each message from
# its queue or, if it has none there, from the dead letters, and tells
# each other broker that held a copy in flight (C{gone}).  Returns how
# many copies each acknowledgement deleted.
ACK = (
    _PRELUDE
    + r"""
local broker = ARGV[1]
local function remove(qid, id)
  local ready, rows, owned, deliveries, ids = qkeys(qid)
  local held = redis.call('HGET', ids, id)
  if not held then
    return 0
  end
  redis.call('HDEL', ids, id)
  local removed = 0
  for seq in string.gmatch(held, '%S+') do
    local owner = redis.call('HGET', owned, seq)
    if owner then
      if owner ~= broker then
        redis.call('PUBLISH', P .. 'events', 'gone ' .. owner .. ' ' .. qid .. ' ' .. id)
      end
      redis.call('HDEL', owned, seq)
    else
      redis.call('ZREM', ready, seq)
    end
    if redis.call('HDEL', rows, seq) == 1 then
      removed = removed + 1
    end
    redis.call('HDEL', deliveries, seq)
  end
  if removed > 0 then
    unlive(id, removed)
  end
  return removed
end
local out = {}
for i = 2, #ARGV, 3 do
  local removed = remove(ARGV[i], ARGV[i + 2])
  if removed == 0 and ARGV[i + 1] ~= '' then
    removed = remove(ARGV[i + 1], ARGV[i + 2])
  end
  out[#out + 1] = removed
end
return out
"""
)

# ARGV: qid, clientId, event, subscribed ('1'/'0'), filter JSON or 'null',
# maxLength or 'null'.  Saves the queue's subscription; bumps the
# subscriptions version if it changed.  Returns {version, messages,
# whether this call bumped it}.
SAVE = (
    _PRELUDE
    + r"""
local meta = '[' .. cjson.encode(ARGV[2]) .. ',' .. cjson.encode(ARGV[3]) .. ','
  .. (ARGV[4] == '1' and 'true' or 'false') .. ',' .. ARGV[5] .. ',' .. ARGV[6] .. ']'
local version = redis.call('GET', P .. 'subs') or '0'
local changed = 0
if redis.call('HGET', P .. 'queues', ARGV[1]) ~= meta then
  redis.call('HSET', P .. 'queues', ARGV[1], meta)
  version = redis.call('INCR', P .. 'subs')
  redis.call('PUBLISH', P .. 'events', 'subs')
  changed = 1
end
return {tonumber(version), redis.call('HLEN', P .. '{q' .. ARGV[1] .. '}:rows'), changed}
"""
)

# ARGV: qid.  Deletes the queue, its subscription and its messages.
# Returns the new subscriptions version.
DELETE = (
    _PRELUDE
    + r"""
local qid = ARGV[1]
local ready, rows, owned, deliveries, ids = qkeys(qid)
local held = redis.call('HGETALL', ids)
for i = 1, #held, 2 do
  local n = 0
  for _ in string.gmatch(held[i + 1], '%S+') do
    n = n + 1
  end
  unlive(held[i], n)
end
redis.call('DEL', ready, rows, owned, deliveries, ids)
redis.call('HDEL', P .. 'queues', qid)
redis.call('SREM', P .. 'expiring', qid)
local version = redis.call('INCR', P .. 'subs')
redis.call('PUBLISH', P .. 'events', 'subs')
return version
"""
)

# ARGV: clientId, event, messageId, the broker's queue limit, 'all' or
# 'one', how many at most (of all: a long dead-letter queue is moved in
# several calls), and (of all) the last seq the previous call moved.  Moves
# dead letters of (clientId, event) that are not in flight back to that
# queue at their places, delivery counts reset: the one, or all, as many
# as the queue's limit allows.  Returns {moved, the last seq moved, whether
# there may be more (1/0), qid...}.
REQUEUE = (
    _PRELUDE
    + r"""
local client, event, all, id = ARGV[1], ARGV[2], ARGV[5] == 'all', ARGV[3]
local dead = qid_of(client, event .. '.dead')
local dready, drows, downed, ddeliveries, dids = qkeys(dead)
local seqs
local examined = 0
if all then
  -- After the cursor ARGV[7]: a message that dies again while the rest
  -- are moved is not moved twice.
  seqs = redis.call('ZRANGE', dready, '(' .. ARGV[7], '+inf', 'BYSCORE',
                    'LIMIT', 0, tonumber(ARGV[6]))
  examined = #seqs
else
  seqs = {}
  local held = redis.call('HGET', dids, id)
  if held then
    for seq in string.gmatch(held, '%S+') do
      if redis.call('ZSCORE', dready, seq) then
        seqs[#seqs + 1] = seq
      end
    end
  end
end
if #seqs == 0 then
  return {0, '0', 0}
end
local qid, length = ensure(client, event)
local limit = tonumber(ARGV[4])
if length and length < limit then
  limit = length
end
local room = limit - redis.call('HLEN', P .. '{q' .. qid .. '}:rows')
local moved, last, full = 0, '0', false
for _, seq in ipairs(seqs) do
  if moved >= room then
    full = true
    break
  end
  local row = take(dead, seq)
  if row then
    local head, rest = header(row)
    head = string.match(head, '^(.*),[^,]*,[^,]*%]$') .. ',null,null]'
    put(qid, seq, head .. rest, 0)
    moved = moved + 1
  end
  last = seq
end
local more = 0
if all and not full and examined == tonumber(ARGV[6]) then
  more = 1
end
return notified({moved, last, more})
"""
)

# ARGV: broker, its description, now, max deliveries, how many expired
# messages to move at most, milliseconds its heartbeat lasts.  The broker's heartbeat: it renews its own,
# gives back the messages of every broker whose heartbeat has lapsed, and
# moves expired messages at the head of queues to their dead letters.
# Returns {reaped brokers, messages given back, expired, how many times
# this broker has been given up for dead, qid...}.
BEAT = (
    _PRELUDE
    + r"""
local me, now, most, budget = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
-- How many times other brokers have given this one up for dead: the
-- broker compares it with the last count it saw (an answer can be lost).
local lapses = tonumber(redis.call('HGET', P .. 'lapses', me) or '0')
redis.call('SET', P .. 'alive:' .. me, '1', 'PX', ARGV[6])
redis.call('HSET', P .. 'brokers', me, ARGV[2])
local brokers = redis.call('HKEYS', P .. 'brokers')
local reaped, returned, expired = 0, 0, 0
for _, broker in ipairs(brokers) do
  if redis.call('EXISTS', P .. 'alive:' .. broker) == 0 then
    reaped = reaped + 1
    returned = returned + give_back_all(broker)
    redis.call('HDEL', P .. 'brokers', broker)
    redis.call('HINCRBY', P .. 'lapses', broker, 1)
  end
end
for _, qid in ipairs(redis.call('SMEMBERS', P .. 'expiring')) do
  local m = meta_of(qid)
  local ready, rows = qkeys(qid)
  if not m or redis.call('HLEN', rows) == 0 then
    redis.call('SREM', P .. 'expiring', qid)
  elseif not is_dead(m[2]) then
    while expired < budget do
      local head = redis.call('ZRANGE', ready, 0, 0)[1]
      if not head then
        break
      end
      local e = expiry(redis.call('HGET', rows, head) or '[]\n')
      if not e or e > now then
        break
      end
      to_dead(qid, m[1], m[2], head, 'expired', now)
      expired = expired + 1
    end
  end
end
return notified({reaped, returned, expired, lapses})
"""
)

# ARGV: broker, qid, then the seqs of that queue the broker holds.  Gives
# back every other message of the queue Redis says the broker holds (a
# claim whose answer was lost).  Returns the qids that got ready messages.
UNCLAIM = (
    _PRELUDE
    + r"""
local broker, qid = ARGV[1], ARGV[2]
local keep = {}
for i = 3, #ARGV do
  keep[ARGV[i]] = true
end
local ready, rows, owned = qkeys(qid)
local held = redis.call('HGETALL', owned)
for i = 1, #held, 2 do
  if held[i + 1] == broker and not keep[held[i]] then
    redis.call('HDEL', owned, held[i])
    redis.call('ZADD', ready, held[i], held[i])
    NOTIFY[qid] = true
  end
end
return notified({})
"""
)

# No ARGV.  Returns {version, qid, meta, qid, meta...}, read together.
SUBSCRIPTIONS = r"""
local out = {tonumber(redis.call('GET', 'caps:s:subs') or '0')}
local all = redis.call('HGETALL', 'caps:s:queues')
for i = 1, #all do
  out[#out + 1] = all[i]
end
return out
"""

# ARGV: broker.  Gives back everything the broker holds and drops its
# heartbeat (it is closing).
LEAVE = (
    _PRELUDE
    + r"""
local broker = ARGV[1]
give_back_all(broker)
redis.call('DEL', P .. 'alive:' .. broker)
redis.call('HDEL', P .. 'brokers', broker)
redis.call('HDEL', P .. 'lapses', broker)
return notified({})
"""
)

# ARGV: qid, after, limit.  The queue's messages after sequence number
# C{after}, oldest first, at most C{limit}, left in place: {count after,
# (seq, row, deliveries, owner or '')...}.  Reads the ready ones in order
# from their sorted set and all those in flight (as many as consumers
# hold): a look at a long queue does not read all of it.
PEEK = (
    _PRELUDE
    + r"""
local ready, rows, owned, deliveries = qkeys(ARGV[1])
local after, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local seqs = {}
for _, seq in ipairs(redis.call('ZRANGE', ready, '(' .. after, '+inf', 'BYSCORE',
                                'LIMIT', 0, limit)) do
  seqs[#seqs + 1] = tonumber(seq)
end
local count = redis.call('ZCOUNT', ready, '(' .. after, '+inf')
local held = redis.call('HKEYS', owned)
for _, seq in ipairs(held) do
  if tonumber(seq) > after then
    seqs[#seqs + 1] = tonumber(seq)
    count = count + 1
  end
end
table.sort(seqs)
local out = {count}
for i = 1, math.min(limit, #seqs) do
  local seq = tostring(seqs[i])
  out[#out + 1] = seq
  out[#out + 1] = redis.call('HGET', rows, seq)
  out[#out + 1] = redis.call('HGET', deliveries, seq) or '0'
  out[#out + 1] = redis.call('HGET', owned, seq) or ''
end
return out
"""
)

# How many messages one call of PURGE or REQUEUE moves at most.
CHUNK = 1000

# ARGV: qid, how many at most, the last seq to purge ('' for the last one
# published so far).  Deletes the oldest messages of the queue that are not
# in flight, up to that many (a long queue is purged in several calls, so
# that Redis is not busy for seconds; the later calls are given the first
# one's last seq, so nothing published meanwhile is purged).  Returns
# {how many, the last seq}.
PURGE = (
    _PRELUDE
    + r"""
local qid = ARGV[1]
local upto = ARGV[3]
if upto == '' then
  upto = redis.call('GET', P .. 'seq') or '0'
end
local ready = qkeys(qid)
local purged = 0
for _, seq in ipairs(redis.call('ZRANGE', ready, '-inf', upto, 'BYSCORE',
                                'LIMIT', 0, tonumber(ARGV[2]))) do
  local row = take(qid, seq)
  if row then
    unlive(message_id(row), 1)
    purged = purged + 1
  end
end
return {purged, upto}
"""
)

SCRIPTS = {
    "peek": PEEK,
    "purge": PURGE,
    "publish": PUBLISH,
    "claim": CLAIM,
    "give": GIVE,
    "ack": ACK,
    "save": SAVE,
    "delete": DELETE,
    "requeue": REQUEUE,
    "beat": BEAT,
    "unclaim": UNCLAIM,
    "subscriptions": SUBSCRIPTIONS,
    "leave": LEAVE,
}
