"""
The order of a connection's replies: each frame's answer goes out after
the answers to every earlier frame, including those that wait for the
store (an C{ok} that confirms a change only once it is on disk) or for a
C{getAll} to finish.  Mixed into L{caps.protocol.BrokerProtocol}.
"""

from twisted.python.failure import Failure

from caps import frames

# Bytes of replies a client may leave unread (its send buffer full) before
# it is cut off: replies cannot be paused like deliveries.
MAX_UNREAD = 8 * 1024 * 1024


class Replies:
    """
    The replies half of a connection.  Uses the protocol's C{broker},
    C{transport}, C{peer}, C{log}, C{send_paused}, C{unread}, C{_write()}
    and C{_write_held()}, and its C{_replies}, C{_durable_batch} and
    C{_durable_slots}.
    """

    def _refused(self, e):
        self.log.info(
            "{peer} refused: {code}: {message}",
            peer=self.peer,
            code=e.code,
            message=e.message,
        )
        return frames.error(e.code, e.message, e.request_id)

    def _reply(self, reply, request_id=None):
        """
        Write a reply after every reply to earlier frames.  C{reply} is a
        line, or a L{Deferred} firing with one: an C{ok} that goes out only
        once what it confirms is on disk, or the end of a C{getAll}.
        """
        if type(reply) is bytes:
            if not self._replies:
                self._write_reply(reply)
            else:
                self._replies.append([reply, True, request_id])
            return
        slot = [None, False, request_id]
        self._replies.append(slot)

        def done(result):
            closes = False
            if isinstance(result, Failure):
                closes = getattr(result.value, "closes", False)
                if result.check(frames.ProtocolError):
                    result.value.request_id = request_id
                    result = self._refused(result.value)
                else:
                    self.log.failure("failed to answer {peer}", result, peer=self.peer)
                    result = internal_error(request_id)
            slot[:2] = [result, True]
            self._write_ready()
            if closes:
                self._write_held()
                self.transport.loseConnection()

        reply.addBoth(done)

    def _wait_durable(self, line, request_id):
        """
        Hold a reply until the changes made so far are durable, behind
        every earlier reply.  The replies a batch of the store's changes
        confirms share one wait on the store.

        @return: whether the reply is held (else it may go out now).
        """
        store = self.broker.store
        batch = store.pending()
        if batch is None:
            return False
        if batch is not self._durable_batch:
            self._durable_batch = batch
            self._durable_slots = []
            store.flushed().addBoth(self._durable, self._durable_slots)
        slot = [line, False, request_id]
        self._durable_slots.append(slot)
        self._replies.append(slot)
        return True

    def _durable(self, result, slots):
        """
        A batch of the store's changes is durable, or could not be made
        so: the replies it held go out, as they were or as errors.
        """
        if isinstance(result, Failure):
            if result.check(frames.ProtocolError):
                e = result.value
                self.log.info(
                    "{peer} refused {count} frame(s): {code}: {message}",
                    peer=self.peer,
                    count=len(slots),
                    code=e.code,
                    message=e.message,
                )
                for slot in slots:
                    slot[0] = frames.error(e.code, e.message, slot[2])
            else:
                self.log.failure("failed to answer {peer}", result, peer=self.peer)
                for slot in slots:
                    slot[0] = internal_error(slot[2])
        for slot in slots:
            slot[1] = True
        self._write_ready()

    def _write_ready(self):
        """
        Write the replies at the front of the queue that are ready.
        """
        replies = self._replies
        while replies and replies[0][1]:
            self._write_reply(replies.popleft()[0])

    def _write_reply(self, line):
        """
        Write a reply; a client that keeps asking but does not read its
        answers is cut off once they pile up.
        """
        if self.send_paused:
            self.unread += len(line)
            if self.unread > MAX_UNREAD:
                if not self.transport.disconnecting:
                    self.log.info(
                        "{peer} does not read its replies; closing", peer=self.peer
                    )
                    self.transport.abortConnection()
                return
        self._write(line)


def internal_error(request_id):
    return frames.error("internal-error", "the broker failed; see its log", request_id)
