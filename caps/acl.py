"""
Who may do what once logged in: the grants of an ACL file, and the
permissions of one clientId.  Pure data, no Twisted.

An ACL file is TOML.  Each table is named by a clientId pattern (C{*},
C{?} and C{[...]} wildcards, as in shell globs) and lists patterns:

    ["acme-*"]
    publish = ["pickup"]        # events it may publish
    to = ["*"]                  # clientIds it may address them to
    consume = ["delivered", "in-transit"]   # events of its queues it may consume

    [dashboard]
    consume = ["*"]
    observe = ["*"]             # other clientIds whose queues it may consume

A client gets the union of every table whose name matches its clientId;
a client that no table matches may only log in and ping.
"""

import fnmatch
import re
import tomllib

import attrs

from caps.frames import DEAD_SUFFIX

KEYS = ("publish", "to", "consume", "observe")


class ACLError(Exception):
    """
    An ACL file that cannot be used; the message says where and why.
    """


def _matcher(patterns):
    """
    One compiled expression matching any of C{patterns}, or L{None} for
    none.
    """
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns))


@attrs.frozen
class Grant:
    """
    What one ACL table (or the default) allows: four tuples of patterns.
    """

    publish: tuple = ()
    to: tuple = ()
    consume: tuple = ()
    observe: tuple = ()


# Without an ACL file: publish anything to anyone, consume one's own queues.
DEFAULT_GRANT = Grant(publish=("*",), to=("*",), consume=("*",))


@attrs.define(eq=False)
class Permissions:
    """
    What one logged-in clientId may do.
    """

    client_id: str
    grant: Grant
    _publish: object = attrs.field(init=False)
    _to: object = attrs.field(init=False)
    _consume: object = attrs.field(init=False)
    _observe: object = attrs.field(init=False)

    def __attrs_post_init__(self):
        self._publish = _matcher(self.grant.publish)
        self._to = _matcher(self.grant.to)
        self._consume = _matcher(self.grant.consume)
        self._observe = _matcher(self.grant.observe)

    def publish_refusal(self, event, to):
        """
        Why this client may not publish C{event} to the clientIds C{to}, or
        L{None} if it may.
        """
        if self._publish is None or not self._publish.match(event):
            return f"{self.client_id} may not publish {event!r}"
        for client_id in to:
            if self._to is None or not self._to.match(client_id):
                return f"{self.client_id} may not address messages to {client_id!r}"
        return None

    def sees(self, client_id):
        """
        Whether this client may look at C{client_id}'s queues and messages
        (its own, or those its ACL lets it observe).
        """
        if client_id is None:
            return False
        return client_id == self.client_id or (
            self._observe is not None and bool(self._observe.match(client_id))
        )

    @property
    def sees_all(self):
        """
        Whether it may observe every clientId (the operator's view).
        """
        return "*" in self.grant.observe

    def consume_refusal(self, client_id, event):
        """
        Why this client may not consume the queue (C{client_id}, C{event})
        (subscribe to it, read, acknowledge or give back its messages), or
        L{None} if it may.  A queue's dead letters (C{<event>.dead}) go
        with its event.
        """
        if client_id != self.client_id and (
            self._observe is None or not self._observe.match(client_id)
        ):
            return f"{self.client_id} may not use {client_id}'s queues"
        if event.endswith(DEAD_SUFFIX):
            event = event[: -len(DEAD_SUFFIX)]
        if self._consume is None or not self._consume.match(event):
            return f"{self.client_id} may not consume {event!r}"
        return None


@attrs.frozen
class ACL:
    """
    The tables of an ACL file, in order: C{(clientId pattern, Grant)}.
    """

    tables: tuple = ()

    def permissions(self, client_id):
        """
        The union of the grants of every table matching C{client_id}.
        """
        parts = {key: [] for key in KEYS}
        for pattern, grant in self.tables:
            if fnmatch.fnmatchcase(client_id, pattern):
                for key in KEYS:
                    parts[key].extend(getattr(grant, key))
        return Permissions(client_id, Grant(**{k: tuple(v) for k, v in parts.items()}))


class OpenACL:
    """
    The permissions of every logged-in client when no ACL file is given:
    L{DEFAULT_GRANT}.
    """

    def permissions(self, client_id):
        return Permissions(client_id, DEFAULT_GRANT)


def parse_acl(text, where="ACL"):
    """
    Parse an ACL file's text.

    @raise ACLError: for bad TOML, an unknown key or a value that is not a
        list of strings.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ACLError(f"{where}: {e}") from None
    tables = []
    for pattern, table in document.items():
        if not isinstance(table, dict):
            raise ACLError(
                f"{where}: {pattern!r} must be a table ([{pattern}]), "
                "not a value at the top level"
            )
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            raise ACLError(
                f"{where}: [{pattern}] has unknown key(s) {', '.join(unknown)}; "
                f"the keys are {', '.join(KEYS)}"
            )
        values = {}
        for key, value in table.items():
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ACLError(f"{where}: [{pattern}] {key} must be a list of strings")
            values[key] = tuple(value)
        tables.append((pattern, Grant(**values)))
    return ACL(tuple(tables))


def load_acl(path):
    """
    Read and parse an ACL file.

    @raise ACLError: if it cannot be read or parsed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ACLError(f"cannot read ACL file {path}: {e}") from None
    return parse_acl(text, where=str(path))
