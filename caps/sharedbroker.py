"""
A broker that shares its state with other brokers through one Redis
(C{twistd caps-broker --store redis://... --shared}).

Redis holds every queue's messages and decides what two brokers could
disagree on (L{caps.store.sharedlayout}); this broker holds only the
messages it has claimed for its own connections.  It uses the single
broker's code for everything that happens between a claim and the message
leaving: round robin over consumers, prefetch and the connection-wide
limit, ack timeouts, delayed nacks.  What differs:

  - a publish is decided by a script (dedupe, limits, sequence number,
    every addressee), and answered from its result;
  - routing uses every broker's subscriptions: the publish script refuses
    a publish routed with an older subscriptions version (C{stale}), and
    the broker reads them again and routes again;
  - a consumer with room claims ready messages from Redis, when its queue
    announces some (pub/sub) or when it gets room;
  - a message leaving a consumer unacknowledged goes back to Redis, where
    any broker may claim it; Redis moves it to the dead letters if it was
    delivered too often or expired;
  - a C{getAll} claims, for its connection, what the queue held when it
    asked.
"""

import json

import attrs
from twisted.internet import defer

from caps.broker import Broker
from caps.frames import DEAD_SUFFIX, encode_json
from caps.message import Message
from caps.publishing import QueueFull
from caps.queue import Queue
from caps.store import UNAVAILABLE, StoreUnavailable
from caps.store.redislayout import message as read_row
from caps.store.shared import RETRY_DELAY, subscriptions_of
from caps.store.sharedlayout import CHUNK, dead_qid, qid

# Messages one claim takes at most: consumers on other brokers get their
# share of a busy queue.
CLAIM_MOST = 200
# Times a publish is routed again after the subscriptions changed under it.
ROUTE_TRIES = 10


@attrs.define(eq=False)
class SharedCatchup:
    """
    A C{getAll} on a shared store: like L{caps.sessions.Catchup}, and
    C{until} is learnt from the first claim (the last sequence number
    published when it ran).

    @ivar claiming: a claim for it is under way.
    @ivar exhausted: Redis has no more ready messages it covers.
    """

    queue: object
    until: int | None
    done: object
    failed: object
    count: int = 0
    claiming: bool = False
    exhausted: bool = False


@attrs.define(eq=False)
class SharedBroker(Broker):
    """
    A L{Broker} on a L{caps.store.shared.SharedStore}.
    """

    _by_qid: dict = attrs.Factory(dict)
    # Queues with a claim under way, and those that heard of new ready
    # messages meanwhile
    _claiming: set = attrs.Factory(set)
    _again: set = attrs.Factory(set)
    # Queues whose last claim found Redis had nothing more ready
    _drained: set = attrs.Factory(set)
    _version: int = 0
    _refreshing: bool = False
    _refresh_again: bool = False
    _refreshed: list = attrs.Factory(list)
    # Queues -> subscription saves under way
    _saving: dict = attrs.Factory(dict)
    # Queues -> claims out; queues whose lost claim is to be undone
    _claims_out: dict = attrs.Factory(dict)
    _lost: set = attrs.Factory(set)

    def __attrs_post_init__(self):
        self._id_prefix = self.store.broker_id + "-"
        super().__attrs_post_init__()
        self._version = self.store.version
        for queue in self._queues.values():
            self._by_qid[queue.qid] = queue
        self.store.attach(self)

    def _queue(self, client_id, event):
        queue = self._queues.get((client_id, event))
        if queue is None:
            queue = Queue(client_id, event, qid(client_id, event))
            self._queues[client_id, event] = queue
            self._by_client.setdefault(client_id, {})[queue] = None
            self._by_qid[queue.qid] = queue
        return queue

    def _delete(self, queue):
        super()._delete(queue)
        self._by_qid.pop(queue.qid, None)
        self._drained.discard(queue)

    # What the other brokers did

    def heard(self, kind, words):
        """
        News from the brokers' channel: C{ready} (qids with new ready
        messages), C{subs} (a subscription changed), C{gone} (a message
        this broker holds was acknowledged through another), or C{resync}
        (the listener was cut off and may have missed some).
        """
        if kind == "ready":
            for name in words:
                queue = self._by_qid.get(name)
                if queue is not None:
                    self._woken(queue)
        elif kind == "subs":
            self._refresh()
        elif kind == "gone":
            broker, name, message_id = words[0], words[1], " ".join(words[2:])
            queue = self._by_qid.get(name)
            if broker == self.store.broker_id and queue is not None:
                entry = queue.remove(message_id)
                if entry is not None:
                    if entry.owner is not None:
                        self._take_back(entry)
                    self._pump(queue)
        elif kind == "resync":
            self._refresh()
            for queue in list(self._queues.values()):
                self._woken(queue)

    def lapsed(self):
        """
        This broker was given up for dead (its heartbeat lapsed: Redis was
        out of reach, or too busy, for longer than it lasts) and another
        gave back every message it held, which may be on their way to
        other consumers now.  Forget them all: none is this broker's to
        send, give back or time out any more (a consumer still holding one
        may acknowledge it; that goes to Redis).
        """
        # Out of every queue first, then out of the sessions: taking one
        # back can send more (its session had been full), and nothing
        # forgotten may be sent.
        forgotten = []
        for queue in list(self._queues.values()):
            for entry in queue.entries():
                if not entry.removed:
                    queue.remove(entry.message.id)
                    entry.delayed = False
                    forgotten.append(entry)
        for entry in forgotten:
            if entry.owner is not None:
                self._take_back(entry)
        held = len(forgotten)
        self.log.warn(
            "this broker was given up for dead by the others (no heartbeat "
            "for {seconds} s); the {count} message(s) it held are theirs now",
            seconds=self.store.alive / 1000,
            count=held,
        )
        for queue in list(self._queues.values()):
            self._woken(queue)

    def _woken(self, queue):
        self._drained.discard(queue)
        if queue in self._claiming:
            self._again.add(queue)
        elif queue.with_room:
            self._pump(queue)

    def _refresh(self):
        """
        Read every subscription again (another broker changed one).
        """
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        d = self.store.call("subscriptions", retry=True)
        d.addCallbacks(self._got_subscriptions, self._refresh_failed)

    def _refresh_failed(self, failure):
        self._refreshing = False
        self.log.failure("reading the shared subscriptions failed", failure)
        self.clock.callLater(RETRY_DELAY, self._refresh)

    def _got_subscriptions(self, answer):
        self._refreshing = False
        version, metas = subscriptions_of(answer)
        for client_id, event, subscribed, flt, max_length in metas.values():
            queue = self._queues.get((client_id, event))
            if queue is None:
                if not subscribed:
                    # Routed to by address only: nothing to know here.
                    continue
                queue = self._queue(client_id, event)
            if queue in self._saving:
                # Its save, behind this read, is what counts.
                continue
            if (
                queue.subscribed != subscribed
                or queue.filter != flt
                or queue.max_length != max_length
            ):
                queue.subscribed = subscribed
                queue.filter = flt
                queue.max_length = max_length
                if subscribed:
                    self._index.add(queue, flt)
                else:
                    self._index.remove(queue)
        for queue in list(self._queues.values()):
            if (
                queue.qid not in metas
                and queue.subscribed
                and queue not in self._saving
            ):
                # Deleted through another broker.
                self._delete(queue)
        self._version = version
        waiting, self._refreshed = self._refreshed, []
        for d in waiting:
            d.callback(None)
        if self._refresh_again:
            self._refresh_again = False
            self._refresh()

    def _changed(self, version, bumped):
        """
        This broker saved a subscription, and Redis's version is now
        C{version}: if its save C{bumped} it to the next after the one this
        broker read, nobody else changed one meanwhile and its own view is
        current; else, if it differs, read them all again.
        """
        if version == self._version:
            return
        if bumped and version == self._version + 1 and not self._refreshing:
            self._version = version
        else:
            self._refresh()

    def _fresh_subscriptions(self):
        """
        A L{Deferred} firing once the subscriptions were read again.
        """
        d = defer.Deferred()
        self._refreshed.append(d)
        self._refresh()
        return d

    # Publishing

    def publish(
        self, event, payload, body, to=(), message_id=None, ttl=None, sender=None
    ):
        """
        As L{Broker.publish}, decided by Redis: a L{Deferred} of the answer.
        """
        self._check_writable()
        return self._publish(
            ROUTE_TRIES, event, payload, body, to, message_id, ttl, sender
        )

    def _publish(self, tries, event, payload, body, to, message_id, ttl, sender):
        now = self.clock.seconds()
        if ttl is None:
            ttl = self.default_ttl
        expires = now + ttl if ttl is not None else None
        matched = self._index.match(event, payload)
        matched_qids = [queue.qid for queue in matched]
        rest = b"".join(
            [
                b",",
                encode_json(event),
                b",",
                repr(now).encode("ascii"),
                b",",
                b"null" if expires is None else repr(expires).encode("ascii"),
                b",null,null]",
            ]
        )
        d = self.store.call(
            "publish",
            self._version,
            now,
            self._id_prefix,
            self.max_queue,
            b"" if message_id is None else encode_json(message_id),
            now + self.dedupe_window,
            event,
            rest,
            body,
            len(to),
            *to,
            len(matched_qids),
            *matched_qids,
            notify=[qid(client_id, event) for client_id in to] + matched_qids,
        )
        return d.addCallback(
            self._answered,
            (tries, event, payload, body, to, message_id, ttl, sender),
            now,
            expires,
            matched,
        )

    def _answered(self, answer, publish, now, expires, matched):
        """
        The client's answer to a publish, from the script's; a publish
        routed with subscriptions that changed since is routed again.
        """
        kind = answer[0]
        if kind == b"ok":
            _, event, _, body, to, _, _, sender = publish
            return self._published(
                answer, event, body, now, expires, to, matched, sender
            )
        if kind == b"duplicate":
            return {
                "messageId": answer[1].decode("utf-8"),
                "queues": 0,
                "duplicate": True,
            }
        if kind == b"full":
            client_id, target, count, limit = answer[1:]
            raise QueueFull(
                f"queue ({client_id.decode('utf-8')}, {target.decode('utf-8')})"
                f" is full: {count} messages, the limit is {limit}"
            )
        # stale: a subscription changed since this broker read them.
        tries = publish[0]
        if tries <= 1:
            raise StoreUnavailable(UNAVAILABLE)
        return self._fresh_subscriptions().addCallback(
            lambda _: self._publish(tries - 1, *publish[1:])
        )

    def _published(self, answer, event, body, now, expires, to, matched, sender):
        message_id = answer[1].decode("utf-8")
        message = Message(message_id, event, body, int(answer[2]), now, expires)
        # Addressees this broker does not serve are named, not kept.
        queues = [self._named(client_id, event) for client_id in to]
        queues = list(dict.fromkeys(queues + matched))
        if self.log_events:
            self._events.add(message)
        self.monitor.published(message, queues, sender)
        for queue in queues:
            queue.published += 1
            if queue.consumers:
                self._woken(queue)
        return {"messageId": message_id, "queues": int(answer[3])}

    # Consuming

    def subscribe(
        self,
        connection,
        client_id,
        event,
        filter=None,
        prefetch=None,
        ack_timeout=None,
        max_length=None,
    ):
        answer = super().subscribe(
            connection, client_id, event, filter, prefetch, ack_timeout, max_length
        )
        queue = self._queues[client_id, event]
        self._saving[queue] = self._saving.get(queue, 0) + 1
        d = self.store.call(
            "save",
            queue.qid,
            client_id,
            event,
            "1",
            json.dumps(filter, separators=(",", ":")),
            json.dumps(max_length),
            retry=True,
        )

        def saved(result):
            version, count, bumped = result
            self._changed(version, bumped)
            return dict(answer, messages=count)

        def settled(result):
            left = self._saving.pop(queue) - 1
            if left:
                self._saving[queue] = left
            return result

        return d.addCallback(saved).addBoth(settled)

    def unsubscribe(self, connection, client_id, event, delete=False):
        if delete:
            self._check_writable()
            self._queue(client_id, event)
        answer = super().unsubscribe(connection, client_id, event, delete)
        if not delete:
            return answer
        # Not tried again after a failed round trip: a second run could
        # delete what was published to the queue since.
        d = self.store.call("delete", qid(client_id, event))

        def deleted(version):
            self._changed(version, True)
            return answer

        def failed(failure):
            # Deleted here, perhaps not in Redis: route by what Redis has.
            self._refresh()
            return failure

        return d.addCallbacks(deleted, failed)

    def _pump(self, queue):
        super()._pump(queue)
        if queue.with_room:
            if queue not in self._drained:
                self._claim(queue)
        else:
            # Claimed for consumers that went away or cannot take them now
            # (paused, full): ready for the others.
            while (entry := queue.pop_ready()) is not None:
                self._give(entry, sent=False)

    def _claim(self, queue):
        if queue in self._claiming:
            self._again.add(queue)
            return
        want = 0
        for consumer in queue.with_room:
            if consumer.has_room():
                session = consumer.session
                want += min(
                    consumer.prefetch - consumer.held,
                    session.max_unacked - len(session.in_flight),
                )
        want = min(want, CLAIM_MOST)
        if want <= 0:
            return
        self._claiming.add(queue)
        d = self._claim_call(queue, want, "")
        d.addCallbacks(
            self._claimed,
            self._claim_failed,
            callbackArgs=(queue, want),
            errbackArgs=(queue,),
        )

    def _claim_call(self, queue, want, until):
        name = queue.qid
        self._claims_out[name] = self._claims_out.get(name, 0) + 1
        d = self.store.call(
            "claim",
            queue.qid,
            self.store.broker_id,
            want,
            self.clock.seconds(),
            self.max_deliveries,
            until,
            "1" if queue.holds_dead_letters else "0",
        )
        return d

    def _claim_done(self, queue):
        """
        A claim of C{queue} was answered, and what it took is in the
        queue's entries (or it failed): once none is out, a lost one can be
        undone without undoing another's (see L{_unclaim}).
        """
        name = queue.qid
        left = self._claims_out.pop(name) - 1
        if left:
            self._claims_out[name] = left
        elif name in self._lost:
            self._lost.discard(name)
            # What this broker holds of the queue now (a queue deleted and
            # made again is another object with the same qid).
            current = self._by_qid.get(name, queue)
            held = [entry.message.seq for entry in current.entries()]
            self.store.call(
                "unclaim", self.store.broker_id, name, *held, retry=True
            ).addErrback(self._failed, "giving back a lost claim")

    def _entries_of(self, answer, queue):
        """
        The messages a claim took, as entries of C{queue} not yet ready
        nor in flight, and the sequence number it claimed up to.
        """
        count = int(answer[1])
        entries = []
        for i in range(2, 2 + 3 * count, 3):
            message, deliveries, dead = read_row(
                int(answer[i]), answer[i + 1], answer[i + 2]
            )
            entry = queue.take_in(message, deliveries - 1, dead)
            entries.append(entry)
        until = answer[0]
        return entries, (int(until) if until else None)

    def _claimed(self, answer, queue, want):
        self._claiming.discard(queue)
        again = queue in self._again
        self._again.discard(queue)
        entries, _ = self._entries_of(answer, queue)
        self._claim_done(queue)
        if len(entries) < want and not again:
            self._drained.add(queue)
        if self._queues.get(queue.key) is not queue:
            # Deleted or forgotten meanwhile.
            for entry in entries:
                self._give(entry, sent=False)
            return
        for entry in entries:
            queue.make_ready(entry)
        self._pump(queue)

    def _claim_failed(self, failure, queue):
        self._claiming.discard(queue)
        self._again.discard(queue)
        if self.store.leaving:
            self._claim_done(queue)
            return
        if not _refused(failure):
            self._unclaim(queue)
        self._claim_done(queue)
        if not failure.check(StoreUnavailable) and not _refused(failure):
            self.log.warn(
                "claiming from ({clientId}, {event}) failed: {error}",
                clientId=queue.client_id,
                event=queue.event,
                error=failure.getErrorMessage(),
            )
        self.clock.callLater(RETRY_DELAY, self._pump, queue)

    def _unclaim(self, queue):
        """
        A claim's answer was lost: give back whatever Redis says this
        broker holds of C{queue} that it does not know it holds, once no
        other claim of the queue is out (whose messages it would not know
        of yet either).
        """
        self._lost.add(queue.qid)

    def _failed(self, failure, what):
        if failure.check(StoreUnavailable) and self.store.leaving:
            # Closing: its LEAVE gives back everything it held.
            return
        self.log.failure(what + " failed", failure)

    # Catching up

    def get_all(self, connection, client_id, event):
        done = defer.Deferred()

        def finished(count):
            done.callback({"clientId": client_id, "event": event, "count": count})

        session = self._sessions[connection]
        queue = self._queue(client_id, event)
        session.catchups.append(SharedCatchup(queue, None, finished, done.errback))
        if len(session.catchups) == 1:
            self._continue_catchups(session)
        return done

    def _continue_catchups(self, session):
        while session.catchups and not session.paused:
            catchup = session.catchups[0]
            if catchup.claiming:
                return
            if catchup.exhausted:
                session.catchups.popleft()
                catchup.done(catchup.count)
                self._forget(catchup.queue)
                continue
            if session.full:
                # The rest waits for acknowledgements.
                return
            want = min(CLAIM_MOST, session.max_unacked - len(session.in_flight))
            catchup.claiming = True
            until = "now" if catchup.until is None else catchup.until
            d = self._claim_call(catchup.queue, want, until)
            d.addCallbacks(
                self._caught,
                self._catchup_failed,
                callbackArgs=(session, catchup, want),
                errbackArgs=(session, catchup),
            )
            return

    def _caught(self, answer, session, catchup, want):
        catchup.claiming = False
        queue = catchup.queue
        entries, catchup.until = self._entries_of(answer, queue)
        self._claim_done(queue)
        gone = self._sessions.get(session.connection) is not session
        sent = 0
        for entry in entries:
            if gone or session.paused or session.full:
                self._give(entry, sent=False)
            else:
                self._send(session, entry, None)
                sent += 1
        catchup.count += sent
        if len(entries) < want and sent == len(entries):
            catchup.exhausted = True
        if not gone:
            self._continue_catchups(session)

    def _forget(self, queue):
        """
        Drop this broker's record of a queue it no longer has any use for
        (a C{getAll} of a queue nobody here consumes): Redis keeps it.
        """
        if (
            not queue.subscribed
            and not queue.consumers
            and not queue.in_memory
            and queue.qid not in self._claims_out
            and not any(
                c.queue is queue
                for session in self._sessions.values()
                for c in session.catchups
            )
            and self._queues.get(queue.key) is queue
        ):
            del self._queues[queue.key]
            mine = self._by_client[queue.client_id]
            del mine[queue]
            if not mine:
                del self._by_client[queue.client_id]
            del self._by_qid[queue.qid]
            self._drained.discard(queue)

    def _catchup_failed(self, failure, session, catchup):
        catchup.claiming = False
        refused = _refused(failure)
        if not refused and not self.store.leaving:
            self._unclaim(catchup.queue)
        self._claim_done(catchup.queue)
        if self._sessions.get(session.connection) is not session:
            return
        if refused or failure.check(StoreUnavailable):
            # Redis out of reach, or this broker not beating yet: the
            # getAll goes on where it was once it can.
            if not self.store.leaving:
                self.clock.callLater(RETRY_DELAY, self._continue_catchups, session)
            return
        session.catchups.remove(catchup)
        self.log.failure("getAll failed", failure)
        catchup.failed(failure)
        self._continue_catchups(session)

    # What observers see

    def queue(self, client_id, event):
        """
        The queue (clientId, event) as this broker knows it; one it does
        not serve is named for the occasion (Redis may hold it).
        """
        return self._named(client_id, event)

    def _named(self, client_id, event):
        """
        This broker's queue (clientId, event), or one made for the
        occasion and not kept.  (A queue with no message is false: not
        C{or}.)
        """
        queue = self._queues.get((client_id, event))
        if queue is None:
            return Queue(client_id, event, qid(client_id, event))
        return queue

    def peek(self, client_id, event, after=0, limit=100):
        """
        As L{Broker.peek}, read from Redis: a L{Deferred}.
        """
        d = self.store.call("peek", qid(client_id, event), after, limit)

        def shown(answer):
            rows = []
            for i in range(1, len(answer), 4):
                message, deliveries, _ = read_row(
                    int(answer[i]), answer[i + 1], answer[i + 2]
                )
                rows.append(
                    {
                        "seq": message.seq,
                        "messageId": message.id,
                        "time": message.time,
                        "payload": message.payload.decode("utf-8"),
                        "deliveries": deliveries,
                        "inFlight": bool(answer[i + 3]),
                    }
                )
            return rows, int(answer[0]) - len(rows)

        return d.addCallback(shown)

    def purge(self, client_id, event):
        """
        As L{Broker.purge}, in Redis: a L{Deferred}.
        """
        self._check_writable()
        queue = self._queues.get((client_id, event))
        if queue is not None:
            # Claimed here and not sent yet: not in flight either.
            while (entry := queue.pop_ready()) is not None:
                self._give(entry, sent=False)
        return self._purge(qid(client_id, event), 0, "")

    def _purge(self, name, purged, until):
        """
        Purge queue C{name} a chunk at a time, up to what was published
        when it started; a L{Deferred} of how many in all.  A chunk is not
        run again after a failed round trip: a second run could delete what
        was published since.
        """

        def more(answer):
            count, last = int(answer[0]), answer[1]
            if count < CHUNK:
                return purged + count
            return self._purge(name, purged + count, last)

        return self.store.call("purge", name, CHUNK, until).addCallback(more)

    # Acknowledging, giving back, requeueing

    def received(self, client_id, event, message_id):
        self._check_writable()
        dead = event.endswith(DEAD_SUFFIX)
        for name in [event] if dead else [event, event + DEAD_SUFFIX]:
            queue = self._queues.get((client_id, name))
            entry = queue.remove(message_id) if queue is not None else None
            if entry is not None:
                if entry.owner is not None:
                    self._take_back(entry)
                self._pump(queue)
                break
        d = self.store.call(
            "ack",
            self.store.broker_id,
            qid(client_id, event),
            "" if dead else dead_qid(client_id, event),
            message_id,
            retry=True,
        )

        def acknowledged(count):
            if count:
                self.monitor.totals.acknowledged += 1
            return {
                "clientId": client_id,
                "event": event,
                "messageId": message_id,
                "deleted": count > 0,
            }

        return d.addCallback(acknowledged)

    def _return(self, entry, delay=0):
        if delay > 0:
            entry.delayed = True
            self._delays.add(self.clock.seconds() + delay, entry)
        else:
            self._give(entry)

    def _dead_letter(self, entry, reason):
        # Met expired on its way out (_next_ready), never sent: Redis moves
        # it, seeing why itself.
        self._give(entry, sent=False)

    def _delay_over(self, entry):
        if entry.delayed and not entry.removed:
            entry.delayed = False
            self._give(entry)

    def _give(self, entry, sent=True):
        """
        Give a message this broker claimed back to Redis, ready for any
        broker (or to the dead letters, if Redis finds it is due there);
        one never C{sent} has its claim's delivery count taken back.
        """
        queue = entry.queue
        if queue.get(entry.message.id) is entry:
            queue.remove(entry.message.id)
        self.store.call(
            "give",
            self.store.broker_id,
            self.clock.seconds(),
            self.max_deliveries,
            queue.qid,
            entry.message.seq,
            "0" if sent else "1",
            retry=True,
        ).addErrback(self._failed, "giving a message back")

    def requeue(self, client_id, event, message_id=None):
        self._check_writable()
        return self._requeue(client_id, event, message_id, 0).addCallback(
            lambda moved: {"clientId": client_id, "event": event, "requeued": moved}
        )

    def _requeue(self, client_id, event, message_id, moved, after="0"):
        """
        Requeue a chunk at a time, each after the last seq the one before
        moved (a message that dies again meanwhile is not moved twice); a
        L{Deferred} of how many in all.  Not run again after a failed round
        trip: a second run would answer for what the first left.
        """

        def more(answer):
            count, last, again = int(answer[0]), answer[1], int(answer[2])
            if not again:
                return moved + count
            return self._requeue(client_id, event, message_id, moved + count, last)

        d = self.store.call(
            "requeue",
            client_id,
            event,
            message_id or "",
            self.max_queue,
            "all" if message_id is None else "one",
            CHUNK,
            after,
        )
        return d.addCallback(more)


def _refused(failure):
    """
    Whether Redis refused a claim because this broker is not beating (it
    was given up for dead and has not beaten since): nothing was claimed.
    """
    from redis.exceptions import ResponseError

    return failure.check(ResponseError) is not None and str(failure.value).startswith(
        "REAPED"
    )
