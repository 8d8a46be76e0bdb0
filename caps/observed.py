"""
What the broker shows its observers (the web pages, the JSON API, the
metrics, caps.admin): queue and client rows, a look at a queue's messages
without consuming them, and purging a queue.  Mixed into
L{caps.broker.Broker}.
"""

from caps.monitor import queue_row


class Observed:
    """
    The observers' half of the broker.  It uses the broker's C{clock},
    C{store}, C{_queues}, C{_by_client}, C{_sessions}, C{_release()} and
    C{_check_writable()}.
    """

    def queue_rows(self, visible=None, client_id=None):
        """
        Every queue (or those for which C{visible(clientId)} is true, or
        those of C{client_id} only) as the operator's page shows it,
        ordered by (clientId, event).
        """
        now = self.clock.seconds()
        if client_id is not None:
            mine = self._by_client.get(client_id, ())
            return [
                queue_row(self, queue, now)
                for queue in sorted(mine, key=lambda q: q.event)
            ]
        return [
            queue_row(self, queue, now)
            for key, queue in sorted(self._queues.items())
            if visible is None or visible(key[0])
        ]

    def client_rows(self, visible=None):
        """
        Every connection: its address, the clientId it logged in as (or
        L{None}), the queues it consumes and how many messages are in
        flight to it.  (A connection tells its address and login by its
        C{remote} and C{identity} attributes, if it has them.)
        """
        rows = []
        for connection, session in self._sessions.items():
            identity = getattr(connection, "identity", None)
            client_id = identity.client_id if identity is not None else None
            consuming = sorted(q.key for q in session.consuming)
            if visible is not None and not (
                visible(client_id) or any(visible(c) for c, _ in consuming)
            ):
                continue
            rows.append(
                {
                    "address": getattr(connection, "remote", None),
                    "clientId": client_id,
                    "subscriptions": [
                        {"clientId": c, "event": e} for c, e in consuming
                    ],
                    "inFlight": len(session.in_flight),
                }
            )
        return rows

    def peek(self, client_id, event, after=0, limit=100):
        """
        The messages of (clientId, event) held in memory with a sequence
        number after C{after}, oldest first, at most C{limit}, without
        consuming them; and how many more the queue holds past them
        (those beyond the store's window included).
        """
        queue = self._queues.get((client_id, event))
        if queue is None:
            return [], 0
        shown, count = queue.held_after(after, limit)
        rows = [
            {
                "seq": e.message.seq,
                "messageId": e.message.id,
                "time": e.message.time,
                "payload": e.message.payload.decode("utf-8"),
                "deliveries": e.deliveries,
                "inFlight": e.owner is not None,
            }
            for e in shown
        ]
        return rows, count - len(shown) + queue.spilled

    def purge(self, client_id, event):
        """
        Delete every message of (clientId, event) that is not in flight;
        the queue and its subscription stay.

        @return: how many were deleted.
        """
        self._check_writable()
        queue = self._queues.get((client_id, event))
        if queue is None:
            return 0
        purged = 0
        for entry in queue.purge():
            self.store.entry_removed(queue, entry.message)
            self._release(entry.message)
            purged += 1
        return purged
