"""
CAPS: a message-queue broker on Twisted that holds every delivery event
for its recipient until the recipient acknowledges it.
"""

__version__ = "0.7.2"
