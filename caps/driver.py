"""
The driver app: takes orders from the shared C{driver} queue, announces
C{in-transit}, and after a delay C{delivered}, to the order's store.

    python -m caps.driver --name ann
"""

import sys

import attrs
from twisted.internet import defer, task

from caps import app
from caps.client import CapsError
from caps.frames import NAME
from caps.options import positive_int, seconds

# The clientId of the drivers' shared queue: every pickup goes there.
DRIVERS = "driver"


@attrs.define(eq=False)
class Driver:
    """
    One driver among any number consuming (driver, pickup): each order goes
    to one of them.  The events it publishes carry messageIds derived from
    the orderId, so a pickup handled twice (after a reconnect, or by two
    drivers) never reaches the store twice; the pickup is acknowledged only
    once C{delivered} is confirmed.

    @ivar orders: stop after delivering this many; L{None} to run on.
    @ivar capacity: the most orders it carries at once (its prefetch): the
        broker gives the rest to drivers with room.
    @ivar done: fires when C{orders} are delivered.
    """

    client: object
    name: str
    clock: object
    emit: object
    delay: float = 2.0
    orders: int | None = None
    capacity: int = 3
    started: int = 0
    delivered: int = 0
    done: defer.Deferred = attrs.Factory(defer.Deferred)

    def start(self):
        self.client.on_connect = lambda: self.emit(f"DRIVER {self.name}: connected")
        self.client.subscribe(DRIVERS, "pickup", self._pickup, prefetch=self.capacity)

    def _pickup(self, delivery):
        self.started += 1
        if self.orders is not None and self.started >= self.orders:
            # Take no more: the broker gives back what it sent meanwhile.
            self.client.unsubscribe(DRIVERS, "pickup")
        return defer.ensureDeferred(self._deliver(delivery.payload))

    async def _deliver(self, order):
        order_id = order.get("orderId")
        store = order.get("store")
        if (
            not isinstance(order_id, str)
            or not isinstance(store, str)
            or not NAME.match(store)
        ):
            self.emit(f"DRIVER {self.name}: skipped a malformed order {order!r}")
            return
        self.emit(f"DRIVER {self.name}: picked up {order_id}")
        news = dict(order, driver=self.name)
        try:
            await self.client.publish(
                "in-transit", news, to=store, message_id="in-transit:" + order_id
            )
            self.emit(f"DRIVER {self.name}: {order_id} in transit")
            await task.deferLater(self.clock, self.delay)
            await self.client.publish(
                "delivered", news, to=store, message_id="delivered:" + order_id
            )
        except CapsError as e:
            self.emit(f"DRIVER {self.name}: could not deliver {order_id}: {e}")
            return
        self.emit(f"DRIVER {self.name}: delivered {order_id}")
        self.delivered += 1
        if self.orders is not None and self.delivered >= self.orders:
            if not self.done.called:
                self.done.callback(None)


class Options(app.AppOptions):
    synopsis = "[options]"
    longdesc = "A delivery driver: picks up orders and delivers them."
    optParameters = [
        ["name", None, "ann", "This driver's name (shown to stores)."],
        ["delay", "d", 2.0, "Seconds between pickup and delivery.", seconds],
        ["capacity", "c", 3, "Orders carried at once.", positive_int],
    ]


def main(reactor, *argv):
    options = app.parse(Options(), argv)
    return app.run(
        reactor,
        options,
        lambda client: Driver(
            client,
            options["name"],
            reactor,
            app.emit,
            delay=options["delay"],
            orders=options["orders"],
            capacity=options["capacity"],
        ),
        client_id=DRIVERS,
    )


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
