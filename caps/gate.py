"""
The broker's guard on each connection: logging in, checking each frame
against the client's permissions, the frame rate, and the time a client
may take to finish a line.  Mixed into L{caps.protocol.BrokerProtocol}.
"""

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import task
from twisted.internet.interfaces import ISSLTransport

from caps import frames
from caps.auth import IClient

# Seconds before the answer to a failed login: doubled for each failure
# from the same address lately, up to the maximum.
LOGIN_DELAY = 1.0
LOGIN_DELAY_MAX = 30.0
# Failed logins after which the connection is closed.
MAX_LOGIN_FAILURES = 3


def login_delay(count):
    """
    Seconds before answering the C{count}th failed login from one address
    lately.
    """
    return min(LOGIN_DELAY * 2 ** (count - 1), LOGIN_DELAY_MAX)


class Unauthenticated(frames.ProtocolError):
    code = "unauthenticated"


class Forbidden(frames.ProtocolError):
    code = "forbidden"


class LoginFailed(frames.ProtocolError):
    code = "login-failed"

    def __init__(self, message, closes=False):
        super().__init__(message)
        # The connection closes once this answer is written.
        self.closes = closes


class AlreadyLoggedIn(frames.ProtocolError):
    code = "already-logged-in"


class PayloadTooLarge(frames.ProtocolError):
    code = "payload-too-large"


def _request_id(line):
    """
    The C{id} of a frame, if it has a usable one, without checking the
    rest.
    """
    try:
        frame = frames.decode_json(line)
    except frames.ProtocolError:
        return None
    if isinstance(frame, dict):
        request_id = frame.get("id")
        if type(request_id) in (int, str):
            return request_id
    return None


class Gate:
    """
    The guard half of a connection.  Uses the protocol's C{factory},
    C{broker}, C{transport}, C{peer}, C{log}, C{callLater}, C{_reply},
    C{setTimeout}, C{_lines}, C{_take_unfinished} and C{_unfinished}.

    @ivar identity: the logged-in client's L{caps.auth.IClient}, or
        L{None}.
    @ivar guard: called with each parsed command before it is handled;
        raises to refuse it.  L{None} when the broker has no C{--auth}.
    """

    def _open_gate(self):
        factory = self.factory
        limits = factory.limits
        self.identity = None
        self.guard = None if factory.portal is None else self._unauthenticated
        self._logging_in = False
        self._login_failures = 0
        # Why reading is paused: "rate", "store"
        self._holds = set()
        self._rate = limits.rate
        self._tokens = limits.rate
        self._refilled = self.broker.clock.seconds()
        self._rate_resume = None
        self._rate_refusals = 0
        self._line_timeout = limits.line_timeout
        # When the unfinished line in the buffer was started
        self._partial_since = None
        self._line_timer = None
        self.max_payload = limits.max_payload
        self._handshake_timer = None
        if self._line_timeout and ISSLTransport.providedBy(self.transport):
            # A TLS handshake is the first line a client must finish.
            self._handshake_timer = self.callLater(
                self._line_timeout, self._handshake_timeout
            )

    def _close_gate(self):
        for call in (self._rate_resume, self._line_timer, self._handshake_timer):
            if call is not None and call.active():
                call.cancel()
        if self._rate_refusals:
            self.log.info(
                "{peer} had {count} frame(s) refused for its rate",
                peer=self.peer,
                count=self._rate_refusals,
            )

    # Reading, held and released

    def _hold(self, reason):
        """
        Stop reading from the client until L{_release}d for every reason
        it is held.  Not reading is the broker's doing, so the idle timer
        stops meanwhile.
        """
        if not self._holds:
            self.transport.pauseProducing()
            self.setTimeout(None)
        self._holds.add(reason)

    def _release(self, reason):
        self._holds.discard(reason)
        if not self._holds and self.connected:
            self.transport.resumeProducing()
            self.setTimeout(self.factory.idle_timeout or None)

    # Rate

    def _refill(self, now):
        rate = self._rate
        self._tokens = min(rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now

    def _rate_limited(self, line, later):
        """
        A line came with no token left: refuse it, keep the lines after it
        (C{later}, bytes), and read nothing more until a tenth of a
        second's worth of tokens is back.
        """
        request_id = _request_id(line)
        self._reply(
            frames.error(
                "rate-limited",
                f"more than {self._rate:g} frames a second; "
                "this frame was not handled, send it again later",
                request_id,
            ),
            request_id,
        )
        if not self._rate_refusals:
            self.log.info(
                "{peer} sends more than {rate} frames a second; refusing the "
                "excess (not logged again for this connection)",
                peer=self.peer,
                rate=f"{self._rate:g}",
            )
        self._rate_refusals += 1
        self._unfinished = [later]
        self._unfinished_length = len(later)
        self._hold("rate")
        wait = (max(1.0, self._rate / 10) - self._tokens) / self._rate
        self._rate_resume = self.callLater(wait, self._rate_over)

    def _rate_over(self):
        self._rate_resume = None
        self._release("rate")
        if self.connected and not self.transport.disconnecting:
            # The lines kept back.
            data = self._take_unfinished()
            if b"\n" in data:
                self._lines(data)
            elif data:
                self._unfinished = [data]
                self._unfinished_length = len(data)

    # Unfinished lines (slowloris), and unfinished TLS handshakes

    def handshakeCompleted(self):
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _handshake_timeout(self):
        self._handshake_timer = None
        self.log.info(
            "{peer} did not finish its TLS handshake in {seconds} s; closing",
            peer=self.peer,
            seconds=self._line_timeout,
        )
        # No TLS yet: nothing can be said to it.
        self.transport.abortConnection()

    def _watch_partial(self, now, started):
        """
        Called after each read that leaves an unfinished line; C{started}
        says whether the line started in this read.
        """
        if started or self._partial_since is None:
            self._partial_since = now
        if self._line_timer is None:
            self._line_timer = self.callLater(self._line_timeout, self._check_partial)

    def _check_partial(self):
        self._line_timer = None
        since = self._partial_since
        if since is None or not self.connected or self.transport.disconnecting:
            return
        left = since + self._line_timeout - self.broker.clock.seconds()
        if left > 0 or self._holds:
            # Newer than the timeout, or not read because of the broker.
            self._line_timer = self.callLater(
                max(left, self._line_timeout), self._check_partial
            )
            return
        self.log.info(
            "{peer} did not finish a line in {seconds} s; closing",
            peer=self.peer,
            seconds=self._line_timeout,
        )
        self._close_with(
            frames.error(
                "line-timeout",
                f"a line must be finished within {self._line_timeout:g} s; closing",
            )
        )

    # Logging in

    def _unauthenticated(self, command):
        if type(command) is not frames.Login:
            raise Unauthenticated(
                'log in first: {"event":"login","payload":'
                '{"clientId":...,"password":...}}'
            )

    def _authorize(self, command):
        kind = type(command)
        if kind is frames.Publish:
            refusal = self.identity.publish_refusal(command.event, command.to)
        elif kind is frames.Ping or kind is frames.Login:
            return
        else:
            refusal = self.identity.consume_refusal(command.client_id, command.event)
        if refusal is not None:
            raise Forbidden(refusal)

    def _login(self, c):
        portal = self.factory.portal
        if portal is None:
            return "ok", {"clientId": c.client_id, "authenticated": False}
        if self.identity is not None:
            raise AlreadyLoggedIn(
                f"logged in as {self.identity.client_id} already; "
                "to be someone else, connect again"
            )
        if self._logging_in:
            raise Unauthenticated("wait for the answer to the login sent before")
        self._logging_in = True
        credentials = UsernamePassword(
            c.client_id.encode("utf-8"), c.password.encode("utf-8")
        )
        d = portal.login(credentials, None, IClient)
        d.addCallbacks(
            self._logged_in,
            self._login_failed,
            callbackArgs=(c.client_id,),
            errbackArgs=(c.client_id,),
        )
        return "ok", d

    def _logged_in(self, result, client_id):
        self._logging_in = False
        _, identity, _ = result
        self.identity = identity
        self.guard = self._authorize
        self.log.info(
            "{peer} logged in as {clientId}", peer=self.peer, clientId=client_id
        )
        return {"clientId": client_id, "authenticated": True}

    def _login_failed(self, failure, client_id):
        if not failure.check(UnauthorizedLogin, UnhandledCredentials):
            self._logging_in = False
            return failure
        self._login_failures += 1
        clock = self.broker.clock
        count = self.factory.admission.login_failed(self.address, clock.seconds())
        delay = login_delay(count)
        closes = self._login_failures >= MAX_LOGIN_FAILURES
        self.log.warn(
            "{peer} failed to log in as {clientId} ({count} failure(s) from "
            "{address} lately); answering in {delay} s{closing}",
            peer=self.peer,
            clientId=client_id,
            count=count,
            address=self.address,
            delay=delay,
            closing="; closing" if closes else "",
        )

        def answer():
            self._logging_in = False
            raise LoginFailed("wrong clientId or password", closes=closes)

        return task.deferLater(clock, delay, answer)
