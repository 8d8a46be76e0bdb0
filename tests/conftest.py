import pytest


@pytest.fixture
def reactor():
    """
    The global reactor, which pytest-twisted runs for the real-network tests.
    """
    from twisted.internet import reactor

    return reactor
