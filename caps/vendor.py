"""
The vendor (retailer) app: places an order (C{pickup}) every few seconds
and thanks the driver for every delivery, including those it missed while
it was not running.

    python -m caps.vendor --store acme-widgets
"""

import random
import sys
import uuid

import attrs
from twisted.internet import defer, task

from caps import app
from caps.driver import DRIVERS
from caps.options import seconds

CUSTOMERS = (
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Katherine Johnson",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Margaret Hamilton",
)
STREETS = ("Main St", "Oak Ave", "Pine Rd", "Elm St", "Maple Dr", "Cedar Ln")
CITIES = ("Seattle, WA", "Portland, OR", "Boise, ID", "Spokane, WA")


def fake_order(store, rng):
    return {
        "store": store,
        "orderId": str(uuid.uuid4()),
        "customer": rng.choice(CUSTOMERS),
        "address": f"{rng.randint(1, 9999)} {rng.choice(STREETS)}, {rng.choice(CITIES)}",
    }


@attrs.define(eq=False)
class Vendor:
    """
    A store: orders go to the drivers' queue; deliveries and in-transit
    notices for this store come back on (store, delivered) and (store,
    in-transit), filtered on the payload's C{store} so that unaddressed
    events for this store arrive too and other stores' never do.

    @ivar orders: stop after placing this many and seeing each delivered;
        L{None} to run on.
    @ivar done: fires when C{orders} are placed and delivered.
    """

    client: object
    store: str
    clock: object
    emit: object
    interval: float = 3.0
    orders: int | None = None
    rng: random.Random = attrs.Factory(random.Random)
    placed: int = 0
    done: defer.Deferred = attrs.Factory(defer.Deferred)
    _undelivered: set = attrs.Factory(set)
    _loop: task.LoopingCall | None = None

    def start(self):
        store_filter = {"store": self.store}
        self.client.on_connect = lambda: self.emit(f"VENDOR {self.store}: connected")
        self.client.subscribe(
            self.store, "in-transit", self._in_transit, filter=store_filter
        )
        self.client.subscribe(
            self.store,
            "delivered",
            self._delivered,
            filter=store_filter,
            on_caught_up=self._caught_up,
        )
        self._loop = task.LoopingCall(self.place_order)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def place_order(self):
        if self.client.stopping or (
            self.orders is not None and self.placed >= self.orders
        ):
            self._loop.stop()
            return
        order = fake_order(self.store, self.rng)
        self.placed += 1
        self._undelivered.add(order["orderId"])
        d = self.client.publish(
            "pickup", order, to=DRIVERS, message_id="pickup:" + order["orderId"]
        )

        def refused(failure):
            self.emit(
                f"VENDOR {self.store}: order {order['orderId']} refused: "
                f"{failure.getErrorMessage()}"
            )
            self._undelivered.discard(order["orderId"])
            self._check_done()

        d.addCallbacks(
            lambda _: self.emit(
                f"VENDOR {self.store}: placed order {order['orderId']} "
                f"for {order['customer']}"
            ),
            refused,
        )

    def _caught_up(self, count):
        if count:
            self.emit(f"VENDOR {self.store}: caught up on {count} missed deliveries")

    def _in_transit(self, delivery):
        order_id = delivery.payload.get("orderId")
        driver = delivery.payload.get("driver", "a driver")
        self.emit(f"VENDOR {self.store}: order {order_id} is in transit with {driver}")

    def _delivered(self, delivery):
        order_id = delivery.payload.get("orderId")
        self.emit(f"VENDOR {self.store}: Thank you for delivering {order_id}")
        self._undelivered.discard(order_id)
        self._check_done()

    def _check_done(self):
        if (
            self.orders is not None
            and self.placed >= self.orders
            and not self._undelivered
            and not self.done.called
        ):
            self.done.callback(None)


class Options(app.AppOptions):
    synopsis = "[options]"
    longdesc = "A retailer: places pickup orders and logs every delivery."
    optParameters = [
        ["store", "s", "acme-widgets", "This store's clientId."],
        ["interval", "i", 3.0, "Seconds between orders.", seconds],
    ]

    def postOptions(self):
        super().postOptions()
        app.check_name(self["store"], "--store")


def main(reactor, *argv):
    options = app.parse(Options(), argv)
    return app.run(
        reactor,
        options,
        lambda client: Vendor(
            client,
            options["store"],
            reactor,
            app.emit,
            interval=options["interval"],
            orders=options["orders"],
        ),
        client_id=options["store"],
    )


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
