"""
Connecting to Redis: the store's URLs (C{redis://}, C{rediss://},
C{unix://}, C{redis+sentinel://}), the password kept out of sight, and the
server's version.
"""

import contextlib
import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from caps.store import StoreError

# The password, when the URL has none: never on the command line.
PASSWORD_ENV = "CAPS_REDIS_PASSWORD"
SENTINEL = "redis+sentinel"
SCHEMES = ("redis", "rediss", "unix", SENTINEL)


def shown(url):
    """
    C{url} without its password (in the user part or a C{password=}
    query parameter), for logs and errors.
    """
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        hidden = [(n, "***" if n == "password" else v) for n, v in query]
        parts = parts._replace(query=urlencode(hidden, safe="*"))
    return urlunsplit(parts)


def connect(url):
    """
    A redis-py client for C{url}; the password from C{$CAPS_REDIS_PASSWORD}
    if the URL has none.  A C{redis+sentinel://} URL names Sentinels and a
    service; the client asks them for the primary, and again after a
    failover.

    @raise StoreError: if the URL is not one Redis takes, or redis-py is
        not installed.
    """
    try:
        import redis
    except ImportError:
        raise StoreError(
            "caps-broker: --store redis:// needs the redis package "
            "(pip install 'caps-broker[redis]')"
        ) from None
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise StoreError(f"caps-broker: not a Redis URL: {shown(url)}")
    options = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0}
    userinfo, at, hosts = parts.netloc.rpartition("@")
    in_url = (at and ":" in userinfo) or "password=" in parts.query
    password = os.environ.get(PASSWORD_ENV)
    if password and not in_url:
        options["password"] = password
    try:
        if parts.scheme == SENTINEL:
            return sentinel_client(parts, options)
        return redis.Redis.from_url(url, **options)
    except ValueError as e:
        raise StoreError(f"caps-broker: bad Redis URL {shown(url)}: {e}") from None


def sentinel_client(parts, options):
    """
    The client of the primary that Sentinels watch, from
    C{redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]}:
    the password is the primary's (the Sentinels take none here).
    """
    from redis.sentinel import Sentinel

    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = user
        if password:
            options["password"] = password
    sentinels = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"not HOST:PORT: {address!r}")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = parts.path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ValueError("the path must be /SERVICE or /SERVICE/DB")
    watchers = Sentinel(
        sentinels,
        sentinel_kwargs={"socket_timeout": options["socket_timeout"]},
        socket_timeout=options["socket_timeout"],
        socket_connect_timeout=options["socket_connect_timeout"],
    )
    return watchers.master_for(service, db=int(db or 0), **options)


def version(client):
    """
    The server's Redis version, as (major, minor).
    """
    text = client.info("server").get("redis_version", "0")
    return tuple(int(part) for part in str(text).split(".")[:2] if part.isdigit())


@contextlib.contextmanager
def opening(client, name):
    """
    Open a store on C{client}: a Redis older than 6.2, a Redis error or a
    L{StoreError} inside closes the client and ends as a L{StoreError}
    with a one-line reason naming C{name} (the password left out).
    """
    import redis

    try:
        if version(client) < (6, 2):
            raise StoreError(f"caps-broker: {name} runs a Redis older than 6.2")
        yield
    except redis.RedisError as e:
        client.close()
        raise StoreError(f"caps-broker: cannot open store {name}: {e}") from None
    except StoreError:
        client.close()
        raise
