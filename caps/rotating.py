"""
A client endpoint over several brokers that share one store: the apps'
C{--broker} given more than once.
"""

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class RotatingEndpoint:
    """
    A client endpoint that connects to one of several endpoints (brokers
    sharing one store), and moves on to the next, after the last to the
    first again, whenever a connection attempt fails or an established
    connection is lost.

    It does not wait or retry by itself: inside L{ClientService} (as
    L{CapsClient} uses it) the service's retry policy spaces the attempts.
    Moving to another broker does not reset the back-off: the service
    counts failed attempts in a row whichever broker they went to.  So a
    first failure on one broker is followed by an attempt on the next after
    the policy's shortest delay, a connection lost after it was made (which
    resets the count) likewise, and when every broker is down the delay
    grows to the policy's maximum instead of sweeping the whole list at full
    speed over and over.

    @param endpoints: the C{IStreamClientEndpoint}s, in the order to try
        them; the first is tried first.
    @param names: what to call each endpoint in the log (say, its endpoint
        description); their C{repr} by default.
    @ivar current: the index of the endpoint the next C{connect()} goes to.
    """

    log = Logger()

    def __init__(self, endpoints, names=None):
        self._endpoints = list(endpoints)
        if not self._endpoints:
            raise ValueError("RotatingEndpoint needs at least one endpoint")
        if names is None:
            names = [repr(endpoint) for endpoint in self._endpoints]
        self.names = list(names)
        if len(self.names) != len(self._endpoints):
            raise ValueError("one name per endpoint")
        # Index of the endpoint the next connect() goes to
        self.current = 0

    def connect(self, protocolFactory):
        index = self.current
        broker = self.names[index]
        self.log.info("connecting to broker {broker}", broker=broker)

        def lost(reason):
            self.log.info(
                "lost the connection to broker {broker}; next: {next}",
                broker=broker,
                next=self._move_on(index),
            )

        def made(protocol):
            self.log.info("connected to broker {broker}", broker=broker)
            # The caller gets the protocol its factory built.
            if isinstance(protocol, _LossNotifyingProtocol):
                return protocol._rotating_protocol
            return protocol

        def failed(failure):
            self.log.info(
                "could not connect to broker {broker} ({why}); next: {next}",
                broker=broker,
                why=failure.getErrorMessage(),
                next=self._move_on(index),
            )
            return failure

        factory = _LossNotifyingFactory(protocolFactory, lost)
        d = self._endpoints[index].connect(factory)
        d.addCallbacks(made, failed)
        return d

    def _move_on(self, index):
        """
        The connection to C{self.names[index]} failed or ended: unless a
        later one already moved on, the next connect() goes to the next.

        @return: the name of the endpoint the next connect() goes to.
        """
        if self.current == index:
            self.current = (index + 1) % len(self._endpoints)
        return self.names[self.current]

    def __repr__(self):
        return f"<RotatingEndpoint next={self.names[self.current]!r} of {self.names!r}>"


class _LossNotifyingFactory:
    """
    Builds C{factory}'s protocols, each wrapped to tell C{lost(reason)} when
    its connection is lost.  Every other attribute is C{factory}'s.
    """

    def __init__(self, factory, lost):
        self._rotating_factory = factory
        self._rotating_lost = lost

    def buildProtocol(self, addr):
        protocol = self._rotating_factory.buildProtocol(addr)
        if protocol is None:
            return None
        return _LossNotifyingProtocol(protocol, self._rotating_lost)

    def __getattr__(self, name):
        return getattr(self._rotating_factory, name)


class _LossNotifyingProtocol:
    """
    A protocol's stand-in that calls C{lost(reason)} after the protocol's
    own C{connectionLost}.

    It declares no interfaces: zope.interface finds the wrapped protocol's
    through C{__getattr__}, so that, for one, a TLS transport still sees an
    C{IHandshakeListener} (as with L{ClientService}'s own stand-in).
    """

    def __init__(self, protocol, lost):
        self._rotating_protocol = protocol
        self._rotating_lost = lost

    def connectionLost(self, reason):
        try:
            return self._rotating_protocol.connectionLost(reason)
        finally:
            self._rotating_lost(reason)

    def __getattr__(self, name):
        return getattr(self._rotating_protocol, name)

    def __repr__(self):
        return f"<{type(self).__name__} wrapping {self._rotating_protocol!r}>"
