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

_ADD_ENTRY = schema.ADD_ENTRY
_DELIVERED = schema.DELIVERED
_REMOVE_ENTRY = schema.REMOVE_ENTRY
_REMEMBER_ID = schema.REMEMBER_ID
# Where the delivery count is in an ADD_ENTRY row
_DELIVERIES = 7


class _Deleted:
    """
    A row in the file before the run, deleted: C{rest} is what else the
    store records of a removal (Redis: the messageId), after C{(qid, seq)}.
    """

    __slots__ = ("rest",)

    def __init__(self, rest):
        self.rest = rest


def coalesce(ops):
    """
    Reduce a batch of changes to statements with the same end result.

    This runs on the writer thread for every message, holding the GIL the
    reactor needs: it is one loop, and a row's state within a run is the
    type of what it maps to (an C{ADD_ENTRY} row, a tuple: new in the
    run, inserted; a delivery count, an int: in the file, updated; a
    L{_Deleted}: in the file, deleted).

    @param ops: C{(sql, params)} pairs, in the order they were made, using
        the statements of L{caps.store.schema}.
    @return: C{(sql, rows)} pairs to run in order with C{executemany}.
    """
    out = []
    entries = {}
    remembered = {}
    for sql, params in ops:
        if sql == _ADD_ENTRY:
            # Only at publish, for a message new in this batch.
            entries[params[0], params[1]] = params
        elif sql == _DELIVERED:
            deliveries, qid, seq = params
            key = (qid, seq)
            row = entries.get(key)
            cls = row.__class__
            if cls is tuple:
                entries[key] = (
                    row[:_DELIVERIES] + (deliveries,) + row[_DELIVERIES + 1 :]
                )
            elif cls is not _Deleted:
                entries[key] = deliveries
        elif sql == _REMOVE_ENTRY:
            key = (params[0], params[1])
            if entries.get(key).__class__ is tuple:
                del entries[key]
            else:
                entries[key] = _Deleted(params[2:])
        elif sql == _REMEMBER_ID:
            remembered[params[0]] = params[1]
        else:
            # A barrier: what came before first, then it.
            _write(out, entries, remembered)
            entries = {}
            remembered = {}
            out.append((sql, [params]))
    _write(out, entries, remembered)
    return out


def _write(out, entries, remembered):
    """
    Append a run's statements to C{out}: inserts, updates, then deletes,
    each kind in one C{executemany}; then the messageIds remembered.
    """
    inserted, updated, deleted = [], [], []
    for (qid, seq), value in entries.items():
        cls = value.__class__
        if cls is tuple:
            inserted.append(value)
        elif cls is int:
            updated.append((value, qid, seq))
        else:
            deleted.append((qid, seq, *value.rest))
    for sql, rows in (
        (_ADD_ENTRY, inserted),
        (_DELIVERED, updated),
        (_REMOVE_ENTRY, deleted),
        (_REMEMBER_ID, list(remembered.items())),
    ):
        if rows:
            out.append((sql, rows))
