"""
End to end: the real broker (twistd) and the real vendor and driver apps,
each its own process, through the scene of caps.demo: a vendor is stopped
while its orders are delivered, the broker is killed with SIGKILL and
started again on its store (SQLite, or a Redis server), and the vendor is
restarted.
"""

import re
import signal
from collections import Counter

import pytest
import pytest_twisted

from caps.demo import PLACED, THANKS, run_scene

from . import redisserver


@pytest_twisted.ensureDeferred
async def test_catch_up_scene(reactor, tmp_path):
    """Every order placed is thanked for exactly once, the missed ones first on restart."""
    scene = await run_scene(
        reactor, str(tmp_path), orders=4, interval=0.2, delay=0.3, timeout=60
    )
    check_scene(scene)


@pytest.mark.skipif(not redisserver.AVAILABLE, reason=str(redisserver.skip_reason))
@pytest_twisted.ensureDeferred
async def test_catch_up_scene_on_redis(reactor, tmp_path):
    """The same on a Redis store: the broker killed and restarted loses nothing and doubles nothing."""
    check_scene(await scene_on_redis(reactor, tmp_path))


@pytest.mark.skipif(not redisserver.AVAILABLE, reason=str(redisserver.skip_reason))
@pytest_twisted.ensureDeferred
async def test_catch_up_scene_on_three_shared_brokers(reactor, tmp_path):
    """
    Three brokers sharing one Redis, each app given all three: the one
    killed midway stays dead, its clients go on through the others, the
    vendor restarted catches up through another broker, and nothing is
    lost or doubled.
    """
    check_scene(
        await scene_on_redis(reactor, tmp_path, brokers=3),
        {
            "broker 1": [-signal.SIGKILL],
            "broker 2": [-signal.SIGTERM],
            "broker 3": [-signal.SIGTERM],
        },
    )


async def scene_on_redis(reactor, tmp_path, brokers=1):
    """
    The scene on a Redis server of its own, stopped afterwards.
    """
    server = redisserver.RedisServer().start()
    try:
        return await run_scene(
            reactor,
            str(tmp_path),
            orders=4,
            interval=0.2,
            delay=0.3,
            timeout=60,
            store=server.url,
            brokers=brokers,
        )
    finally:
        server.stop()


# Killed midway; the second one stopped with SIGTERM, which twistd re-raises
# once it has shut down.
ONE_BROKER = {"broker": [-signal.SIGKILL, -signal.SIGTERM]}


def check_scene(scene, brokers=ONE_BROKER):
    names = [child.name for child in scene.children]
    assert names.count("vendor 1-800-flowers") == 2

    for store in ("acme-widgets", "1-800-flowers"):
        runs = [c for c in scene.children if c.name == "vendor " + store]
        placed = [order for run in runs for order in run.matches(PLACED)]
        thanked = Counter(order for run in runs for order in run.matches(THANKS))
        assert placed, store
        assert set(thanked) == set(placed), store
        assert set(thanked.values()) == {1}, f"{store} thanked twice: {thanked}"

    first, second = [c for c in scene.children if c.name == "vendor 1-800-flowers"]
    missed = set(first.matches(PLACED)) - set(first.matches(THANKS))
    assert missed, "the scene stops 1-800-flowers with orders outstanding"
    lines = second.lines
    caught_up = next(i for i, line in enumerate(lines) if "caught up on" in line)
    assert int(re.search(r"caught up on (\d+)", lines[caught_up]).group(1)) >= len(
        missed
    )
    before = {
        m.group(1)
        for m in map(re.compile(r"delivering (\S+)").search, lines[:caught_up])
        if m
    }
    assert missed <= before
    assert not any("placed order" in line for line in lines[:caught_up])

    codes = [(child.name, child.ended.result) for child in scene.children]
    for name, expected in brokers.items():
        assert [code for n, code in codes if n == name] == expected, codes
    assert {code for name, code in codes if name not in brokers} == {0}, codes
    summary = scene.summary()
    assert (summary["lost"], summary["duplicated"]) == (0, 0)
