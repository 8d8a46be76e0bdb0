"""
Which subscribed queues a published message goes to: a plain data
structure, testable without Twisted.

A subscription is a queue's: (clientId, event) with an optional filter, an
object of payload fields and the values they must equal.  Finding the
queues for a message costs one dictionary look-up per distinct filter field
in use for that event, not one test per subscription: each filtered queue
is indexed under its first field and that field's value, and only the
queues found there have their remaining fields checked.
"""

import json

import attrs


def _value_key(value):
    """
    A hashable key equal for equal JSON values (C{true} and C{1} differ);
    L{None}, which matches no filter, for a value nested too deeply to
    encode (a payload may be nested deeper than a filter can be).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except RecursionError:
        return None


@attrs.define
class SubscriptionIndex:
    # event -> queues without a filter (a dict used as an ordered set)
    _unfiltered: dict = attrs.Factory(dict)
    # event -> first filter field -> value key -> {queue: rest of the filter}
    _filtered: dict = attrs.Factory(dict)
    # queue -> what it was indexed under, to remove it again
    _indexed: dict = attrs.Factory(dict)

    def add(self, queue, filter=None):
        """
        Route messages of C{queue.event} matching C{filter} to C{queue},
        replacing the queue's previous subscription.
        """
        self.remove(queue)
        event = queue.event
        if not filter:
            self._unfiltered.setdefault(event, {})[queue] = None
            self._indexed[queue] = (event, None, None)
            return
        fields = sorted(filter)
        first = fields[0]
        rest = tuple((f, _value_key(filter[f])) for f in fields[1:])
        key = _value_key(filter[first])
        by_value = self._filtered.setdefault(event, {}).setdefault(first, {})
        by_value.setdefault(key, {})[queue] = rest
        self._indexed[queue] = (event, first, key)

    def remove(self, queue):
        """
        Stop routing to C{queue}; harmless if it was not subscribed.
        """
        where = self._indexed.pop(queue, None)
        if where is None:
            return
        event, first, key = where
        if first is None:
            queues = self._unfiltered[event]
            del queues[queue]
            if not queues:
                del self._unfiltered[event]
            return
        by_field = self._filtered[event]
        by_value = by_field[first]
        queues = by_value[key]
        del queues[queue]
        if not queues:
            del by_value[key]
            if not by_value:
                del by_field[first]
                if not by_field:
                    del self._filtered[event]

    def match(self, event, payload):
        """
        The subscribed queues a message of C{event} with C{payload} goes to.
        """
        found = list(self._unfiltered.get(event, ()))
        by_field = self._filtered.get(event)
        if by_field:
            for field, by_value in by_field.items():
                if field not in payload:
                    continue
                queues = by_value.get(_value_key(payload[field]))
                if not queues:
                    continue
                for queue, rest in queues.items():
                    if all(
                        f in payload and _value_key(payload[f]) == v for f, v in rest
                    ):
                        found.append(queue)
        return found
