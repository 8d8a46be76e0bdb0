"""
How the broker hands messages out and gets them back: round robin over the
consumers with room, ack timeouts, delayed returns, dead letters and
expiry.  Mixed into L{caps.broker.Broker}, whose state it works on.
"""

from caps.frames import DEAD_SUFFIX

# Seconds between looks at the head of queues holding messages with a TTL.
EXPIRY_SWEEP = 1.0


class Delivery:
    """
    The delivery half of the broker.  It uses the broker's C{clock},
    C{store}, C{log}, C{max_deliveries}, C{_queue()}, C{_timeouts},
    C{_delays}, C{_expiring} and C{_sweep}.
    """

    # Giving back and bringing back

    def nack(self, connection, client_id, event, message_id, delay=0):
        """
        The consumer gives a message back: ready again now, or after
        C{delay} seconds; to the dead letters if it has been delivered
        C{max_deliveries} times.
        """
        queue = self._queues.get((client_id, event))
        entry = queue.get(message_id) if queue is not None else None
        session = self._sessions[connection]
        nacked = entry is not None and entry.owner is session
        if nacked:
            self._take_back(entry)
            self._return(entry, delay)
            self._pump(queue)
        return {
            "clientId": client_id,
            "event": event,
            "messageId": message_id,
            "nacked": nacked,
        }

    def requeue(self, client_id, event, message_id=None):
        """
        Move dead letters of (clientId, event) back to that queue, at their
        original places, with their delivery counts reset: one, or all (as
        many as the queue's limit allows).  Their expiry stays: an expired
        message goes back to the dead letters at the next sweep.
        """
        self._check_writable()
        dead = self._queues.get((client_id, event + DEAD_SUFFIX))
        moved = 0
        if dead is not None:
            if message_id is None:
                entries = sorted(dead.entries(), key=lambda e: e.message.seq)
            else:
                entries = [e for e in [dead.get(message_id)] if e is not None]
            queue = self._queue(client_id, event)
            room = self._limit(queue) - len(queue)
            for entry in entries:
                if moved >= room:
                    break
                if entry.owner is None:
                    self._move(entry, queue)
                    moved += 1
            self._pump(queue)
        return {"clientId": client_id, "event": event, "requeued": moved}

    # Sending, and taking back

    def _limit(self, queue):
        """
        The most messages C{queue} may hold.
        """
        if queue.max_length is None:
            return self.max_queue
        return min(self.max_queue, queue.max_length)

    def _list(self, consumer):
        """
        Put a consumer with room in its queue's round robin.
        """
        if not consumer.listed and consumer.has_room():
            consumer.listed = True
            consumer.queue.with_room.append(consumer)

    def _pump(self, queue):
        """
        Send ready messages of C{queue} to its consumers that have room,
        round robin.
        """
        with_room = queue.with_room
        while with_room:
            consumer = with_room[0]
            if not consumer.has_room():
                with_room.popleft()
                consumer.listed = False
                continue
            entry = self._next_ready(queue)
            if entry is None:
                break
            with_room.rotate(-1)
            self._send(consumer.session, entry, consumer)
        if queue.spilled:
            self._refill(queue)

    def _next_ready(self, queue, until=None):
        """
        The oldest ready message of C{queue} that has not expired (and was
        published by sequence number C{until}, if given); expired ones met
        on the way go to the dead letters.
        """
        if until is None and not queue.expiring:
            return queue.pop_ready()
        now = None
        while (head := queue.ready_head()) is not None:
            seq, _, expires = head
            if until is not None and seq > until:
                return None
            entry = queue.pop_ready()
            if expires is None or queue.holds_dead_letters:
                return entry
            if now is None:
                now = self.clock.seconds()
            if expires > now:
                return entry
            self._dead_letter(entry, "expired")
        return None

    def _send(self, session, entry, consumer):
        """
        Send an entry to a session, through one of its consumers or (for
        C{getAll}) none.
        """
        holder = consumer if consumer is not None else session
        entry.owner = session
        entry.consumer = consumer
        if consumer is not None:
            consumer.held += 1
        entry.deliveries += 1
        queue = entry.queue
        queue.delivered += 1
        queue.in_flight += 1
        totals = self.monitor.totals
        totals.delivered += 1
        if entry.deliveries > 1:
            totals.redelivered += 1
        self.store.delivered(entry)
        in_flight = session.in_flight
        in_flight[entry] = None
        if len(in_flight) >= session.max_unacked:
            session.full = True
        if holder.ack_timeout > 0:
            holder.timed[entry] = self.clock.seconds() + holder.ack_timeout
            self._arm(holder)
        session.connection.deliver(entry)

    def _take_back(self, entry):
        """
        An entry stops being in flight (acknowledged, given back, timed
        out); its consumer has room again.
        """
        session = entry.owner
        consumer = entry.consumer
        del session.in_flight[entry]
        entry.queue.in_flight -= 1
        holder = consumer if consumer is not None else session
        holder.timed.pop(entry, None)
        entry.owner = None
        entry.consumer = None
        if consumer is not None:
            consumer.held -= 1
            self._list(consumer)
        if session.full:
            session.full = False
            if not session.paused:
                self._unblocked(session)

    def _return(self, entry, delay=0):
        """
        Put an entry that left its consumer back in its queue: now, after
        C{delay} seconds, or in the dead letters if it was delivered too
        often or has expired.
        """
        queue = entry.queue
        if not queue.holds_dead_letters:
            expires = entry.message.expires
            if entry.deliveries >= self.max_deliveries:
                self._dead_letter(entry, "max-deliveries")
                return
            if expires is not None and expires <= self.clock.seconds():
                self._dead_letter(entry, "expired")
                return
        if delay > 0:
            entry.delayed = True
            self._delays.add(self.clock.seconds() + delay, entry)
        else:
            queue.give_back(entry)

    def _delay_over(self, entry):
        if entry.delayed and not entry.removed:
            entry.queue.give_back(entry)
            self._pump(entry.queue)

    # Ack timeouts

    def _arm(self, holder):
        if not holder.armed and holder.timed:
            holder.armed = True
            self._timeouts.add(next(iter(holder.timed.values())), holder)

    def _check_timeouts(self, holder):
        """
        The oldest unacknowledged message of a consumer (or of a session's
        C{getAll}s) may have run out of time: give back every one that has.
        """
        holder.armed = False
        now = self.clock.seconds()
        touched = {}
        count = 0
        while holder.timed:
            entry, deadline = next(iter(holder.timed.items()))
            if deadline > now:
                break
            self._take_back(entry)
            self._return(entry)
            touched[entry.queue] = None
            count += 1
        if count:
            self.log.info(
                "ack timeout: {count} message(s) of {queues} go back",
                count=count,
                queues=", ".join(f"({q.client_id}, {q.event})" for q in touched),
            )
        for queue in touched:
            self._pump(queue)
        self._arm(holder)

    def _retime(self, holder, ack_timeout):
        """
        A consumer's ack timeout changed: messages it holds get no more
        time than the new timeout gives from now, and those sent while it
        had none get that much (deadlines stay in order).
        """
        untimed = holder.ack_timeout <= 0
        holder.ack_timeout = ack_timeout
        if ack_timeout <= 0:
            holder.timed.clear()
            return
        latest = self.clock.seconds() + ack_timeout
        timed = holder.timed
        for entry, deadline in timed.items():
            timed[entry] = min(deadline, latest)
        if untimed:
            for entry in holder.session.in_flight:
                if entry.consumer is holder:
                    timed[entry] = latest
        holder.armed = False
        self._arm(holder)

    # Dead letters and expiry

    def _dead_letter(self, entry, reason):
        """
        Move a message that is not in flight to its queue's dead letters,
        (clientId, event + ".dead"), saying why and when.
        """
        queue = entry.queue
        dead = self._queue(queue.client_id, queue.event + DEAD_SUFFIX)
        self.monitor.totals.dead_lettered += 1
        self._move(entry, dead, entry.deliveries, (reason, self.clock.seconds()))
        self.log.warn(
            "dead letter: {messageId} of ({clientId}, {event}) after "
            "{deliveries} deliveries: {reason}",
            messageId=entry.message.id,
            clientId=queue.client_id,
            event=queue.event,
            deliveries=entry.deliveries,
            reason=reason,
        )
        self._pump(dead)

    def _move(self, entry, target, deliveries=0, dead=None):
        """
        Move a message from its queue to another, at its place there.
        """
        source = entry.queue
        moved = target.insert(entry.message, deliveries)
        moved.dead = dead
        source.remove(entry.message.id)
        self.store.entry_removed(source, entry.message)
        self.store.entry_added(target, moved)
        if entry.message.expires is not None:
            self._watch_expiry(target)
        return moved

    def _watch_expiry(self, queue):
        if queue.holds_dead_letters:
            return
        self._expiring[queue] = None
        if not self._sweep.running:
            self._sweep.start(EXPIRY_SWEEP, now=False)

    def _sweep_expired(self):
        """
        Move expired messages at the head of each queue that can have them
        to the dead letters, so they leave even when nobody consumes.
        """
        now = self.clock.seconds()
        for queue in list(self._expiring):
            try:
                while (head := queue.ready_head()) is not None:
                    expires = head[2]
                    if expires is None or expires > now:
                        break
                    self._dead_letter(queue.pop_ready(), "expired")
            except Exception:
                # One queue's failure must not stop the sweep for all.
                self.log.failure("expiring messages of {queue} failed", queue=queue.key)
            if queue.spilled:
                # Its tail may hold more that expire, nobody consuming.
                self._refill(queue)
            if not queue.expiring:
                del self._expiring[queue]
        if not self._expiring:
            self._sweep.stop()
