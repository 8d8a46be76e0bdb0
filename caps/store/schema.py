"""
The SQLite store's schema, its migrations and the statements that change
it.
"""

# The version of SCHEMA, kept in PRAGMA user_version.
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE queues (
    qid INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL,
    event TEXT NOT NULL,
    subscribed INTEGER NOT NULL,
    filter TEXT,
    max_length INTEGER,
    UNIQUE (client_id, event)
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    payload BLOB NOT NULL,
    time REAL NOT NULL,
    expires REAL
);
CREATE TABLE entries (
    qid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    dead_reason TEXT,
    dead_time REAL,
    PRIMARY KEY (qid, seq)
) WITHOUT ROWID;
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
}

SAVE_QUEUE = (
    "INSERT INTO queues (qid, client_id, event, subscribed, filter, max_length)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (qid) DO UPDATE"
    " SET subscribed = excluded.subscribed, filter = excluded.filter,"
    " max_length = excluded.max_length"
)
DROP_ENTRIES = "DELETE FROM entries WHERE qid = ?"
DROP_QUEUE = "DELETE FROM queues WHERE qid = ?"
ADD_MESSAGE = (
    "INSERT INTO messages (seq, id, event, payload, time, expires)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
ADD_ENTRY = "INSERT INTO entries (qid, seq, deliveries) VALUES (?, ?, 0)"
MOVE_ENTRY = (
    "INSERT OR REPLACE INTO entries (qid, seq, deliveries, dead_reason, dead_time)"
    " VALUES (?, ?, ?, ?, ?)"
)
REMOVE_ENTRY = "DELETE FROM entries WHERE qid = ? AND seq = ?"
DROP_MESSAGE = "DELETE FROM messages WHERE seq = ?"
DELIVERED = "UPDATE entries SET deliveries = ? WHERE qid = ? AND seq = ?"
REMEMBER_ID = "INSERT OR REPLACE INTO dedupe (id, expires) VALUES (?, ?)"
FORGET_IDS = "DELETE FROM dedupe WHERE expires <= ?"
