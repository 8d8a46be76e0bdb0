"""
Tests for caps.frames: parsing client lines and encoding replies.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from caps import frames


def line(obj):
    return json.dumps(obj).encode("utf-8")


class ParseTests(SynchronousTestCase):
    def assertRejected(self, raw, code, mentions=None, request_id=None):
        with self.assertRaises(frames.ProtocolError) as caught:
            frames.parse_line(raw)
        self.assertEqual(caught.exception.code, code)
        self.assertEqual(caught.exception.request_id, request_id)
        if mentions is not None:
            self.assertIn(mentions, caught.exception.message)
        return caught.exception

    def test_subscribe(self):
        """A subscribe frame becomes a Subscribe command with its filter and id."""
        request_id, command = frames.parse_line(
            line(
                {
                    "event": "subscribe",
                    "id": 7,
                    "payload": {
                        "clientId": "acme",
                        "event": "delivered",
                        "filter": {"store": "acme"},
                    },
                }
            )
        )
        self.assertEqual(request_id, 7)
        self.assertEqual(
            command, frames.Subscribe("acme", "delivered", {"store": "acme"})
        )

    def test_empty_filter_is_none(self):
        """An empty filter means no filter."""
        _, command = frames.parse_line(
            line(
                {
                    "event": "subscribe",
                    "payload": {"clientId": "a", "event": "e", "filter": {}},
                }
            )
        )
        self.assertIsNone(command.filter)

    def test_control_frames(self):
        """Each control event parses into its command, getall included."""
        queue = {"clientId": "acme", "event": "delivered"}
        cases = [
            ({"event": "getAll", "payload": queue}, frames.GetAll("acme", "delivered")),
            ({"event": "getall", "payload": queue}, frames.GetAll("acme", "delivered")),
            (
                {"event": "unsubscribe", "payload": dict(queue, delete=True)},
                frames.Unsubscribe("acme", "delivered", True),
            ),
            (
                {"event": "unsubscribe", "payload": queue},
                frames.Unsubscribe("acme", "delivered", False),
            ),
            (
                {"event": "received", "payload": dict(queue, messageId="m1")},
                frames.Received("acme", "delivered", "m1"),
            ),
            ({"event": "ping", "payload": {"n": 1}}, frames.Ping({"n": 1})),
            ({"event": "ping"}, frames.Ping({})),
        ]
        for frame, expected in cases:
            self.assertEqual(frames.parse_line(line(frame)), (None, expected))

    def test_publish(self):
        """A publish keeps its decoded payload, compact encoded body, recipients and id."""
        request_id, command = frames.parse_line(
            line(
                {
                    "event": "pickup",
                    "id": "a",
                    "to": ["driver", "logger", "driver"],
                    "messageId": "order-1",
                    "payload": {"orderId": "1", "items": [1, {"x": None}]},
                }
            )
        )
        self.assertEqual(request_id, "a")
        self.assertEqual(command.to, ("driver", "logger"))
        self.assertEqual(command.message_id, "order-1")
        self.assertEqual(command.payload, {"orderId": "1", "items": [1, {"x": None}]})
        self.assertEqual(command.body, b'{"orderId":"1","items":[1,{"x":null}]}')

    def test_publish_to_one(self):
        """A single clientId in to is a one-element tuple; no to is empty."""
        _, command = frames.parse_line(line({"event": "delivered", "to": "acme"}))
        self.assertEqual(command.to, ("acme",))
        _, command = frames.parse_line(line({"event": "delivered"}))
        self.assertEqual(command.to, ())
        self.assertEqual(command.body, b"{}")

    def test_unicode_payload(self):
        """Non-ASCII text survives and is sent as UTF-8, not escaped."""
        raw = '{"event":"delivered","payload":{"customer":"Zoë 😀 東京"}}'.encode()
        _, command = frames.parse_line(raw)
        self.assertEqual(command.payload["customer"], "Zoë 😀 東京")
        self.assertEqual(command.body, '{"customer":"Zoë 😀 東京"}'.encode())

    def test_lone_surrogate(self):
        """A lone surrogate escape is kept as an escape, so the body stays valid UTF-8 JSON."""
        _, command = frames.parse_line(b'{"event":"e","payload":{"s":"\\ud800x"}}')
        self.assertEqual(json.loads(command.body.decode("utf-8")), {"s": "\ud800x"})

    def test_bad_json(self):
        """Text that is not JSON, not UTF-8, NaN, or absurdly nested is bad-json."""
        self.assertRejected(b"hello", "bad-json")
        self.assertRejected(b'{"event": "e"', "bad-json")
        self.assertRejected(b'{"event": "\xff"}', "bad-json", "UTF-8")
        self.assertRejected(b'{"event": "e", "payload": {"x": NaN}}', "bad-json")
        self.assertRejected(b'{"event": "e", "payload": {"x": Infinity}}', "bad-json")
        self.assertRejected(
            b'{"event": "e", "payload": {"x": -1e999}}', "bad-json", "range"
        )
        self.assertRejected(b"[" * 100_000 + b"]" * 100_000, "bad-json")
        self.assertRejected(
            b'{"event":"e","payload":{"n":' + b"9" * 5000 + b"}}", "bad-json"
        )

    def test_not_an_object(self):
        """JSON that is not an object is bad-frame."""
        for raw in (b"[]", b"1", b'"subscribe"', b"null"):
            self.assertRejected(raw, "bad-frame", "object")

    def test_wrong_types_name_the_field(self):
        """A missing or wrongly typed field is bad-frame and the message names it."""
        cases = [
            ({"payload": {}}, "event"),
            ({"event": 3}, "event"),
            ({"event": "e", "payload": []}, "payload"),
            ({"event": "e", "payload": "x"}, "payload"),
            ({"event": "e", "to": 5}, "to"),
            ({"event": "e", "to": ["a", 5]}, "to"),
            ({"event": "e", "messageId": 5}, "messageId"),
            ({"event": "e", "messageId": ""}, "messageId"),
            ({"event": "e", "messageId": "x" * 129}, "messageId"),
            ({"event": "subscribe", "payload": {"event": "e"}}, "payload.clientId"),
            ({"event": "subscribe", "payload": {"clientId": "c"}}, "payload.event"),
            (
                {"event": "subscribe", "payload": {"clientId": 1, "event": "e"}},
                "payload.clientId",
            ),
            (
                {
                    "event": "subscribe",
                    "payload": {"clientId": "c", "event": "e", "filter": "x"},
                },
                "payload.filter",
            ),
            (
                {
                    "event": "unsubscribe",
                    "payload": {"clientId": "c", "event": "e", "delete": 1},
                },
                "payload.delete",
            ),
            (
                {"event": "received", "payload": {"clientId": "c", "event": "e"}},
                "payload.messageId",
            ),
            (
                {
                    "event": "received",
                    "payload": {"clientId": "c", "event": "e", "messageId": 4},
                },
                "payload.messageId",
            ),
        ]
        for frame, field in cases:
            self.assertRejected(line(frame), "bad-frame", field)

    def test_bad_id(self):
        """An id that is not a string or integer is bad-frame, and is not echoed."""
        for bad in (True, 1.5, [1], {"a": 1}):
            self.assertRejected(line({"event": "ping", "id": bad}), "bad-frame", "id")

    def test_error_keeps_id(self):
        """A frame rejected after its id was read keeps that id for the error."""
        self.assertRejected(
            line({"event": "e", "id": 9, "to": 5}), "bad-frame", "to", request_id=9
        )

    def test_bad_names(self):
        """Event names and clientIds outside the name pattern are bad-name."""
        too_long = "a" * 65
        cases = [
            {"event": "has space"},
            {"event": too_long},
            {"event": "-leading"},
            {"event": ""},
            {"event": "e", "to": "bad/id"},
            {"event": "e", "to": ["ok", ""]},
            {"event": "subscribe", "payload": {"clientId": "a b", "event": "e"}},
            {"event": "getAll", "payload": {"clientId": "a", "event": "é"}},
        ]
        for frame in cases:
            self.assertRejected(line(frame), "bad-name")
        self.assertEqual(
            frames.parse_line(line({"event": "a" * 64}))[1].event, "a" * 64
        )
        self.assertEqual(
            frames.parse_line(line({"event": "x", "to": "1-800-flowers"}))[1].to,
            ("1-800-flowers",),
        )

    def test_reserved_events(self):
        """Reserved names cannot be published, nor subscribed to."""
        for name in (
            "ok",
            "error",
            "pong",
            "logout",
            "hello",
            "join",
            "stats",
        ):
            self.assertRejected(line({"event": name}), "reserved-event", name)
        self.assertRejected(
            line(
                {
                    "event": "subscribe",
                    "payload": {"clientId": "a", "event": "received"},
                }
            ),
            "reserved-event",
        )

    def test_dead_letter_names(self):
        """Events ending in .dead cannot be published; queues of them can be named in control frames."""
        self.assertRejected(line({"event": "pickup.dead"}), "reserved-event", ".dead")
        long_name = "e" * 64 + ".dead"
        _, command = frames.parse_line(
            line(
                {"event": "subscribe", "payload": {"clientId": "c", "event": long_name}}
            )
        )
        self.assertEqual(command.event, long_name)

    def test_publish_names_are_case_sensitive(self):
        """Only the exact control spellings are control frames: GETALL is an ordinary event."""
        _, command = frames.parse_line(line({"event": "GETALL"}))
        self.assertIsInstance(command, frames.Publish)


class HostileFieldTests(SynchronousTestCase):
    assertRejected = ParseTests.assertRejected

    def test_filter_depth(self):
        """A filter nested up to MAX_FILTER_DEPTH is taken; deeper is a bad frame."""

        def nested(depth):
            value = 1
            for _ in range(depth - 1):
                value = [value]
            return {"x": value}

        def subscribe(flt):
            return line(
                {
                    "event": "subscribe",
                    "id": 1,
                    "payload": {"clientId": "c", "event": "e", "filter": flt},
                }
            )

        _, command = frames.parse_line(subscribe(nested(frames.MAX_FILTER_DEPTH)))
        self.assertEqual(command.filter, nested(frames.MAX_FILTER_DEPTH))
        self.assertRejected(
            subscribe(nested(frames.MAX_FILTER_DEPTH + 1)),
            "bad-frame",
            "nested at most 32 deep",
            request_id=1,
        )

    def test_surrogate_message_ids(self):
        """A messageId with a lone surrogate (which no store can write) is a bad frame in every frame that has one."""
        queue = '"clientId":"c","event":"e","messageId":"\\ud800"'
        for raw in (
            b'{"event":"e","id":1,"to":"c","messageId":"\\ud800"}',
            b'{"event":"received","id":1,"payload":{' + queue.encode() + b"}}",
            b'{"event":"nack","id":1,"payload":{' + queue.encode() + b"}}",
            b'{"event":"requeue","id":1,"payload":{' + queue.encode() + b"}}",
        ):
            self.assertRejected(raw, "bad-frame", "lone surrogate", request_id=1)
        _, command = frames.parse_line(line({"event": "e", "messageId": "é✓"}))
        self.assertEqual(command.message_id, "é✓")

    def test_long_integer_message(self):
        """An integer too long to read is refused without Python's advice on raising its limit."""
        e = self.assertRejected(
            b'{"event":"ping","n":' + b"1" * 5000 + b"}", "bad-json"
        )
        self.assertIn("more than 4300 digits", e.message)
        self.assertNotIn("sys.", e.message)


class EncodeTests(SynchronousTestCase):
    def test_reply_with_and_without_id(self):
        """Replies are one compact JSON line; the id is there only when given."""
        self.assertEqual(
            frames.reply("ok", {"a": 1}, 3),
            b'{"event":"ok","payload":{"a":1},"id":3}\n',
        )
        self.assertEqual(frames.reply("pong", {}), b'{"event":"pong","payload":{}}\n')

    def test_error(self):
        """An error frame carries a code and a message."""
        self.assertEqual(
            json.loads(frames.error("bad-json", "nope", "x")),
            {
                "event": "error",
                "id": "x",
                "payload": {"code": "bad-json", "message": "nope"},
            },
        )
