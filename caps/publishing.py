"""
How the broker takes a message in: routing it to queues, the limits, the
messageIds it makes and remembers (dedupe), and the count of the queues
holding each message.  Mixed into L{caps.broker.Broker}, whose state it
works on.
"""

from caps.frames import ProtocolError
from caps.queue import Message


class QueueFull(ProtocolError):
    """
    A publish would go past a queue's limit: refused, nothing dropped.
    """

    code = "queue-full"


class Publishing:
    """
    The publishing half of the broker.  It uses the broker's C{clock},
    C{store}, C{monitor}, C{dedupe_window}, C{default_ttl}, C{log_events},
    C{_state}, C{_index}, C{_events}, C{_id_prefix}, C{_queue()},
    C{_pump()}, C{_limit()}, C{_watch_expiry()} and C{_check_writable()}.
    """

    def publish(
        self, event, payload, body, to=(), message_id=None, ttl=None, sender=None
    ):
        """
        Route a message to the queues of the clientIds in C{to} and to every
        subscribed queue whose filter it matches.

        @param payload: the decoded payload, for filters.
        @param body: the payload as encoded JSON bytes, sent as is.
        @param ttl: seconds it may wait in a queue before it goes to the
            dead letters; L{None} for the broker's default.
        @param sender: the clientId the publisher logged in as, if it did
            (for observers).
        @raise QueueFull: if any of those queues is full; nothing is stored.
        """
        self._check_writable()
        state = self._state
        now = self.clock.seconds()
        seen = state.seen
        if seen:
            self._forget_old_ids(now)
        if message_id is not None and self._held(message_id):
            return {"messageId": message_id, "queues": 0, "duplicate": True}
        # Check every limit before changing anything, even creating the
        # addressees' queues (a new queue is empty, so never full).
        known = state.queues
        existing = [known.get((client_id, event)) for client_id in to]
        matched = self._index.match(event, payload)
        for queue in existing:
            if queue is not None:
                self._check_room(queue)
        for queue in matched:
            if queue not in existing:
                self._check_room(queue)
        if None in existing:
            existing = [
                queue or self._queue(client_id, event)
                for queue, client_id in zip(existing, to, strict=True)
            ]
        if not matched and len(existing) < 2:
            queues = existing
        elif len(existing) == 1 and len(matched) == 1 and existing[0] is matched[0]:
            # Addressed to a queue that is subscribed to the event anyway.
            queues = existing
        else:
            queues = list(dict.fromkeys(existing + matched))
        if message_id is None:
            message_id, counted = self._new_id()
        else:
            counted = True
            remember = now + self.dedupe_window
            seen[message_id] = remember
            self.store.id_remembered(message_id, remember)
        if ttl is None:
            ttl = self.default_ttl
        expires = now + ttl if ttl is not None else None
        state.seq += 1
        message = Message(message_id, event, body, state.seq, now, expires)
        if self.log_events:
            self._events.add(message)
        self.monitor.published(message, queues, sender)
        if queues:
            self.store.message_added(message, queues)
            window = self.store.window
            held = 0
            for queue in queues:
                queue.published += 1
                if queue.spilled or (window is not None and queue.in_memory >= window):
                    # Its tail is in the store only; read back as it drains.
                    queue.spilled += 1
                    continue
                held += 1
                queue.append(message, numbered=not counted)
                if expires is not None:
                    self._watch_expiry(queue)
                if queue.with_room:
                    self._pump(queue)
            if held and counted:
                state.live[message_id] = held
        return {"messageId": message_id, "queues": len(queues)}

    def _check_room(self, queue):
        """
        Raise L{QueueFull} if C{queue} cannot take another message.
        """
        limit = self._limit(queue)
        if len(queue) >= limit:
            raise QueueFull(
                f"queue ({queue.client_id}, {queue.event}) is full: "
                f"{len(queue)} messages, the limit is {limit}"
            )

    def _new_id(self):
        """
        A messageId no message has: the broker's random prefix and the next
        sequence number, skipping any a client chose for itself; and
        whether it must be counted in C{state.live} (it was skipped, so its
        number is not its message's sequence number).
        """
        state = self._state
        seq = state.seq + 1
        while (
            message_id := f"{self._id_prefix}{seq}"
        ) in state.live or message_id in state.seen:
            seq += 1
        return message_id, seq != state.seq + 1

    def _counted(self, message):
        """
        Whether C{state.live} counts the queues holding C{message}: all but
        those whose messageId the broker made from their sequence number
        (a queue finds those by that number; see L{_held}).
        """
        return message.id != f"{self._id_prefix}{message.seq}"

    def _held(self, message_id):
        """
        Whether a message with this messageId is in memory in some queue,
        or was published with it within the dedupe window.
        """
        state = self._state
        if message_id in state.live or message_id in state.seen:
            return True
        prefix = self._id_prefix
        if not message_id.startswith(prefix):
            return False
        # One the broker made (or a client copied): not counted, so look.
        return any(message_id in queue for queue in state.queues.values())

    def _forget_old_ids(self, now):
        seen = self._seen
        while seen:
            message_id, expires = next(iter(seen.items()))
            if expires > now:
                break
            del seen[message_id]

    def _release(self, message):
        """
        A queue no longer holds C{message} in memory.
        """
        live = self._live
        count = live.get(message.id)
        if count is None:
            # Not counted (see L{_counted}).
            return
        if count > 1:
            live[message.id] = count - 1
        else:
            del live[message.id]
