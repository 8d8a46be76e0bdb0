"""
How the SQLite and Redis stores record the broker's changes, and take back
a queue's first messages at start: the same for both.  A change is
recorded as the parameters of the SQLite statement that makes it
(L{caps.store.schema}), which L{caps.store.batch.coalesce} folds; the
Redis store writes each kind as Redis commands instead.
"""

from caps.store.schema import (
    ADD_ENTRY,
    DELIVERED,
    DROP_ENTRIES,
    DROP_QUEUE,
    MOVE_ENTRY,
    REMEMBER_ID,
    REMOVE_ENTRY,
)


def entry_row(queue, message, deliveries, dead=None):
    """
    A message in a queue, as the parameters of L{ADD_ENTRY}.
    """
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


class RecordedChanges:
    """
    The change methods of L{caps.store.IStore} but C{queue_saved}, mixed
    into a store with a C{_record(op, params)}.
    """

    def queue_dropped(self, queue):
        self._record(DROP_ENTRIES, (queue.qid,))
        self._record(DROP_QUEUE, (queue.qid,))

    def message_added(self, message, queues):
        for queue in queues:
            self._record(ADD_ENTRY, entry_row(queue, message, 0))

    def entry_removed(self, queue, message):
        self._record(REMOVE_ENTRY, self._removal(queue, message))

    def _removal(self, queue, message):
        """
        The parameters of L{REMOVE_ENTRY} for C{message} in C{queue}.
        """
        return (queue.qid, message.seq)

    def entry_added(self, queue, entry):
        self._record(
            MOVE_ENTRY, entry_row(queue, entry.message, entry.deliveries, entry.dead)
        )

    def delivered(self, entry):
        self._record(DELIVERED, (entry.deliveries, entry.queue.qid, entry.message.seq))

    def id_remembered(self, message_id, expires):
        self._record(REMEMBER_ID, (message_id, expires))

    def _fill(self, queue, rows, count, live):
        """
        Put a queue's first messages, read back at start, in C{queue}; the
        other C{count - len(rows)} wait in the store.
        """
        for message, deliveries, dead in rows:
            if message.id in queue:
                # Published again after the dedupe window while the first
                # was in the store only: the later one is a duplicate.
                self._record(REMOVE_ENTRY, self._removal(queue, message))
                continue
            queue.append(message, deliveries, dead)
            live[message.id] = live.get(message.id, 0) + 1
        if rows:
            queue.last_seq = rows[-1][0].seq
        queue.spilled = count - len(rows)
