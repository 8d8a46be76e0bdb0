"""
The SQLite store's schema, its migrations and the statements that change
it.

A queued message is one row of C{entries}, payload included: a message
routed to several queues is written once per queue.  That keeps each
message's rows independent (no count of the queues still holding it), so
a queue's tail can live on disk only, and it takes fewer writes than a
table of messages and one of entries did.
"""

# The version of SCHEMA, kept in PRAGMA user_version.
SCHEMA_VERSION = 3

_ENTRIES = """(
    qid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    event TEXT NOT NULL,
    payload BLOB NOT NULL,
    time REAL NOT NULL,
    expires REAL,
    deliveries INTEGER NOT NULL,
    dead_reason TEXT,
    dead_time REAL,
    PRIMARY KEY (qid, seq)
) WITHOUT ROWID"""

SCHEMA = f"""
CREATE TABLE queues (
    qid INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL,
    event TEXT NOT NULL,
    subscribed INTEGER NOT NULL,
    filter TEXT,
    max_length INTEGER,
    UNIQUE (client_id, event)
);
CREATE TABLE entries {_ENTRIES};
CREATE INDEX entries_id ON entries (qid, id);
CREATE TABLE dedupe (
    id TEXT PRIMARY KEY,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX dedupe_expires ON dedupe (expires);
"""

# From each schema version to the next, for stores written by older CAPS.
MIGRATIONS = {
    1: """
    ALTER TABLE queues ADD COLUMN max_length INTEGER;
    ALTER TABLE messages ADD COLUMN expires REAL;
    ALTER TABLE entries ADD COLUMN dead_reason TEXT;
    ALTER TABLE entries ADD COLUMN dead_time REAL;
    """,
    2: f"""
    CREATE TABLE entries3 {_ENTRIES};
    INSERT INTO entries3
        SELECT e.qid, e.seq, m.id, m.event, m.payload, m.time, m.expires,
               e.deliveries, e.dead_reason, e.dead_time
        FROM entries e JOIN messages m ON m.seq = e.seq;
    DROP TABLE entries;
    DROP TABLE messages;
    ALTER TABLE entries3 RENAME TO entries;
    CREATE INDEX entries_id ON entries (qid, id);
    """,
}

SAVE_QUEUE = (
    "INSERT INTO queues (qid, client_id, event, subscribed, filter, max_length)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (qid) DO UPDATE"
    " SET subscribed = excluded.subscribed, filter = excluded.filter,"
    " max_length = excluded.max_length"
)
DROP_ENTRIES = "DELETE FROM entries WHERE qid = ?"
DROP_QUEUE = "DELETE FROM queues WHERE qid = ?"
_COLUMNS = (
    " INTO entries (qid, seq, id, event, payload, time, expires, deliveries,"
    " dead_reason, dead_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A message published into a queue
ADD_ENTRY = "INSERT" + _COLUMNS
# A message moved into a queue (dead letters, requeue)
MOVE_ENTRY = "INSERT OR REPLACE" + _COLUMNS
REMOVE_ENTRY = "DELETE FROM entries WHERE qid = ? AND seq = ?"
DELIVERED = "UPDATE entries SET deliveries = ? WHERE qid = ? AND seq = ?"
REMEMBER_ID = "INSERT OR REPLACE INTO dedupe (id, expires) VALUES (?, ?)"
FORGET_IDS = "DELETE FROM dedupe WHERE expires <= ?"
# A queue's messages after a place, in order
READ_ENTRIES = (
    "SELECT seq, id, event, payload, time, expires, deliveries, dead_reason,"
    " dead_time FROM entries WHERE qid = ? AND seq > ? ORDER BY seq LIMIT ?"
)
REMOVE_BY_ID = "DELETE FROM entries WHERE qid = ? AND id = ? RETURNING seq"
