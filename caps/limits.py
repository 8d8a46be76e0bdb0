"""
What one client may cost the broker: the limits, their defaults, and the
counts the broker keeps across connections (connections per address,
failed logins per address).  Pure data; time comes in as arguments.
"""

from collections import OrderedDict

import attrs

MAX_CONNECTIONS = 10_000
MAX_PER_ADDRESS = 1000
MAX_PAYLOAD = 64 * 1024
MAX_RATE = 20_000.0
LINE_TIMEOUT = 10.0
# Failed logins from one address are remembered this long after the last.
FORGET_FAILURES = 600.0
# Addresses whose failed logins are remembered, at most.
FAILURE_MEMORY = 100_000


@attrs.define
class Limits:
    """
    Per-connection and broker-wide limits (0 turns a rate or a timeout
    off).

    @ivar max_connections: connections open at once, in all.
    @ivar max_per_address: connections open at once from one IP address.
    @ivar max_payload: bytes of a published payload, encoded as compact
        JSON.
    @ivar rate: frames a second one connection may send, on average; it
        may send a second's worth at once.
    @ivar line_timeout: seconds a client may take to finish a line it has
        started.
    """

    max_connections: int = MAX_CONNECTIONS
    max_per_address: int = MAX_PER_ADDRESS
    max_payload: int = MAX_PAYLOAD
    rate: float = MAX_RATE
    line_timeout: float = LINE_TIMEOUT


@attrs.define(eq=False)
class Admission:
    """
    The broker-wide counts behind the limits: open connections, in all and
    per address, and recent failed logins per address.
    """

    limits: Limits
    connections: int = 0
    per_address: dict = attrs.Factory(dict)
    # address -> (failures, time of the last), least recent first
    _failures: OrderedDict = attrs.Factory(OrderedDict)

    def admit(self, address):
        """
        Count a new connection from C{address} (an IP address, or L{None}
        for a UNIX socket), or say why it is refused.

        @return: L{None} if admitted (call L{leave} when it closes), else
            the reason.
        """
        limits = self.limits
        if self.connections >= limits.max_connections:
            return f"the broker has {limits.max_connections} connections already"
        if address is not None:
            count = self.per_address.get(address, 0)
            if count >= limits.max_per_address:
                return f"{address} has {limits.max_per_address} connections already"
            self.per_address[address] = count + 1
        self.connections += 1
        return None

    def leave(self, address):
        self.connections -= 1
        if address is not None:
            count = self.per_address[address] - 1
            if count:
                self.per_address[address] = count
            else:
                del self.per_address[address]

    def login_failed(self, address, now):
        """
        Count a failed login from C{address}.

        @return: how many failed logins came from there lately, this one
            included.
        """
        count = self.recent_failures(address, now) + 1
        failures = self._failures
        failures[address] = (count, now)
        failures.move_to_end(address)
        while len(failures) > FAILURE_MEMORY:
            failures.popitem(last=False)
        return count

    def recent_failures(self, address, now):
        count, last = self._failures.get(address, (0, now))
        if now - last > FORGET_FAILURES:
            return 0
        return count
