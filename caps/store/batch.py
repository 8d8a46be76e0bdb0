"""
A batch of store changes, reduced to what it leaves behind.

The broker records three changes for every message it handles in a queue:
its row is inserted, its delivery count updated, then the row deleted.
Written one statement at a time, interleaved with other messages', that
was most of the SQLite store's cost.  Within one transaction only the end
result counts, so L{coalesce} folds each row's changes into one: a message
published and acknowledged in the same batch is never written at all, a
row inserted and delivered is inserted with its count, and the rest go to
SQLite as one C{executemany} per kind of statement.

Only the statements of that hot path are folded together.  Any other
statement (a queue saved or dropped, an entry moved to the dead letters)
is a barrier: what came before it is written first, then it, in order.
"""

from caps.store import schema

# Entry states within a run of folded changes
_NEW = "new"  # not in the file before the run: INSERT
_UPDATED = "updated"  # in the file: UPDATE its delivery count
_DELETED = "deleted"  # in the file: DELETE
# Where the delivery count is in an ADD_ENTRY row
_DELIVERIES = 7


def coalesce(ops):
    """
    Reduce a batch of changes to statements with the same end result.

    @param ops: C{(sql, params)} pairs, in the order they were made, using
        the statements of L{caps.store.schema}.
    @return: C{(sql, rows)} pairs to run in order with C{executemany}.
    """
    out = []
    run = _Run()
    for sql, params in ops:
        fold = run.folds.get(sql)
        if fold is not None:
            fold(*params)
            continue
        run.write(out)
        run = _Run()
        out.append((sql, [params]))
    run.write(out)
    return out


class _Run:
    """
    The folded result of a run of hot-path changes.
    """

    def __init__(self):
        # (qid, seq) -> [state, row (inserted) or delivery count (updated)]
        self.entries = {}
        # id -> expires; the last one counts
        self.remembered = {}
        self.folds = {
            schema.ADD_ENTRY: self.add_entry,
            schema.DELIVERED: self.delivered,
            schema.REMOVE_ENTRY: self.remove_entry,
            schema.REMEMBER_ID: self.remember,
        }

    def add_entry(self, qid, seq, *rest):
        # Only at publish, for a message new in this batch.
        self.entries[qid, seq] = [_NEW, [qid, seq, *rest]]

    def delivered(self, deliveries, qid, seq):
        entry = self.entries.get((qid, seq))
        if entry is None:
            self.entries[qid, seq] = [_UPDATED, deliveries]
        elif entry[0] == _NEW:
            entry[1][_DELIVERIES] = deliveries
        else:
            entry[1] = deliveries

    def remove_entry(self, qid, seq, *rest):
        # rest: what else a store records of a removal (Redis: the
        # messageId), written after (qid, seq).
        key = (qid, seq)
        entry = self.entries.get(key)
        if entry is not None and entry[0] == _NEW:
            del self.entries[key]
        else:
            self.entries[key] = [_DELETED, rest]

    def remember(self, message_id, expires):
        self.remembered[message_id] = expires

    def write(self, out):
        """
        Append this run's statements to C{out}: inserts, updates, then
        deletes, each kind in one C{executemany}.
        """
        inserted, updated, deleted = [], [], []
        for (qid, seq), (state, value) in self.entries.items():
            if state == _DELETED:
                deleted.append((qid, seq, *value))
            elif state == _UPDATED:
                updated.append((value, qid, seq))
            else:
                inserted.append(value)
        for sql, rows in (
            (schema.ADD_ENTRY, inserted),
            (schema.DELIVERED, updated),
            (schema.REMOVE_ENTRY, deleted),
            (schema.REMEMBER_ID, list(self.remembered.items())),
        ):
            if rows:
                out.append((sql, rows))
