"""
Queues longer than memory: with a store that has a window (SQLite), a
queue keeps at most that many messages in memory, and what is published
to it beyond stays in the store only (its "spilled" tail) until the queue
drains enough to read it back, in order.  Mixed into
L{caps.broker.Broker}.

A queue's spilled messages were all published after the last one it holds
in memory, and every publish to a queue with a spilled tail spills too, so
reading back "the next messages after C{last_seq}" keeps publish order.
Batches are written in order, so whatever part of a tail the store has
written is its oldest part: a read returns it, and a later read finds the
rest once it is written.
"""

from twisted.logger import Logger

from caps import packed

# Seconds before reading a queue's tail again after the store failed to.
RETRY_DELAY = 1.0


class Paging:
    """
    The paging half of the broker.  It uses the broker's C{store},
    C{clock}, C{_state}, C{_pump()}, C{_continue_catchups()},
    C{_watch_expiry()}, C{_dead_letter()} and C{_removed()}.
    """

    _paging_log = Logger()

    def _refill(self, queue):
        """
        Read the next part of C{queue}'s tail back from the store if its
        ready messages in memory run low.
        """
        window = self.store.window
        if not queue.spilled or queue.loading or window is None:
            return
        if queue.consumers:
            # Read back in parts that stay unpacked (caps/packed.py): they
            # are about to be sent, and packing them only to unpack them
            # again made up a tenth of a drain's time.
            window = min(window, packed.UNPACKED_CONSUMED)
        ready = queue.ready_in_memory
        if ready > window // 2:
            return
        queue.loading = True
        limit = max(1, window - ready)
        wait, queue.stale = queue.stale, False
        d = self.store.load_entries(queue, queue.last_seq, limit, wait)
        d.addCallbacks(
            self._loaded,
            self._load_failed,
            callbackArgs=(queue,),
            errbackArgs=(queue,),
        )

    def _loaded(self, rows, queue):
        queue.loading = False
        gone, queue.gone = queue.gone, set()
        if self._state.queues.get(queue.key) is not queue:
            # Deleted meanwhile.
            return
        live = self._state.live
        for message, deliveries, dead in rows:
            seq = message.seq
            if seq in gone:
                # Moved here while on disk, and removed since.
                continue
            held = queue.get(message.id)
            if held is not None:
                if held.message.seq != seq:
                    # The same messageId published again after the dedupe
                    # window while the first was still on disk: the later
                    # one is a duplicate.
                    queue.spilled -= 1
                    self.store.entry_removed(queue, message)
                # Else moved here (a dead letter requeued) and already held.
                continue
            queue.spilled -= 1
            entry = queue.append(message, deliveries, dead)
            if self._counted(message):
                live[message.id] = live.get(message.id, 0) + 1
            if message.expires is not None:
                self._watch_expiry(queue)
            if (
                entry is not None
                and not queue.holds_dead_letters
                and deliveries >= self.max_deliveries
            ):
                self._dead_letter(entry, "max-deliveries")
        if rows:
            # Skipped rows too: a later read must not find them again.
            queue.last_seq = max(queue.last_seq, rows[-1][0].seq)
        if any(seq > queue.last_seq for seq in gone):
            # Their rows may not be deleted yet: the next read waits.
            queue.stale = True
        if not rows and queue.spilled:
            # What is left of the tail is not written yet: read once it is.
            written = self.store.flushed()
            if written is not None:
                queue.loading = True
                written.addBoth(self._written, queue)
                return
            self._paging_log.error(
                "({clientId}, {event}) counts {count} messages on disk that "
                "the store does not have",
                clientId=queue.client_id,
                event=queue.event,
                count=queue.spilled,
            )
            queue.spilled = 0
        self._pump(queue)
        self._resume_waiting(queue)

    def _written(self, result, queue):
        queue.loading = False
        if self._state.queues.get(queue.key) is queue:
            self._refill(queue)
            # A getAll waiting for the tail goes on even if the queue has
            # enough in memory not to read yet.
            if not queue.loading:
                self._resume_waiting(queue)

    def _resume_waiting(self, queue):
        """
        Go on with the getAlls that waited for C{queue}'s tail.
        """
        waiting, queue.waiting = queue.waiting, {}
        for session in waiting:
            self._continue_catchups(session)

    def _load_failed(self, failure, queue):
        queue.loading = False
        # The read may have been one that had to wait for the writes.
        queue.stale = True
        self._paging_log.failure(
            "reading ({clientId}, {event}) back from the store failed; "
            "trying again in {delay} s",
            failure,
            clientId=queue.client_id,
            event=queue.event,
            delay=RETRY_DELAY,
        )
        self._retries[queue] = self.clock.callLater(
            RETRY_DELAY, self._retry_refill, queue
        )

    def _retry_refill(self, queue):
        del self._retries[queue]
        self._refill(queue)

    def _stop_paging(self):
        """
        Cancel the retries of failed reads (the broker is stopping).
        """
        for call in self._retries.values():
            call.cancel()
        self._retries.clear()

    def _remove_spilled(self, queue, message_id, answer):
        """
        Acknowledge a message of C{queue} that is not in memory: it may be
        in the spilled tail.

        @return: a L{Deferred} firing with C{answer}, its C{deleted} set.
        """

        def removed(seqs):
            for seq in seqs:
                entry = queue.get(message_id)
                if entry is not None and entry.message.seq == seq:
                    # Read back meanwhile: remove it from memory too.
                    self._removed(queue, queue.remove(message_id))
                elif self._state.queues.get(queue.key) is queue and (
                    seq > queue.last_seq
                ):
                    # Still counted in the tail (a read that passed it
                    # counted it already).
                    queue.spilled -= 1
            return dict(answer, deleted=bool(seqs))

        return self.store.remove_by_id(queue, message_id).addCallback(removed)
