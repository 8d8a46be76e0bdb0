"""
Tests for tests/redisserver.py, the real Redis servers the Redis store's
tests run against.
"""

import os
import unittest

from twisted.trial.unittest import SynchronousTestCase

from . import redisserver


@unittest.skipIf(not redisserver.AVAILABLE, redisserver.skip_reason)
class RedisServerTests(SynchronousTestCase):
    def dedicated(self, *args):
        server = redisserver.RedisServer(*args)
        self.addCleanup(server.stop)
        return server.start()

    def client(self, server):
        client = server.client()
        self.addCleanup(client.close)
        return client

    def test_shared(self):
        """
        The shared server answers PING, SET and GET, and is the same server
        at every call.
        """
        server = redisserver.shared()
        self.assertIs(redisserver.shared(), server)
        self.assertEqual(server.url, f"redis://127.0.0.1:{server.port}/0")
        client = self.client(server)
        client.flushall()
        self.assertTrue(client.ping())
        client.set(b"caps:key", b"value")
        self.assertEqual(client.get(b"caps:key"), b"value")
        client.flushall()

    def test_restartAfterKill(self):
        """
        Data written before a SIGKILL is there after restart(), on the same
        port.
        """
        server = self.dedicated()
        port = server.port
        client = self.client(server)
        client.set(b"caps:key", b"value")
        server.kill()
        self.assertFalse(server.running)
        server.restart()
        self.assertEqual(server.port, port)
        self.assertEqual(client.get(b"caps:key"), b"value")

    def test_stop(self):
        """
        stop() leaves neither the process nor the directory behind.
        """
        server = self.dedicated()
        pid, directory = server.pid, server.dir
        self.assertTrue(os.path.isdir(directory))
        server.stop()
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertFalse(os.path.exists(directory))

    def test_requirepass(self):
        """
        A server started with --requirepass comes up, and its client() logs
        in with that password.
        """
        server = self.dedicated("--requirepass", "secret")
        self.assertEqual(server.password, "secret")
        self.assertTrue(self.client(server).ping())
