"""
CAPS tests.

Processes the tests start (twistd, the apps, the demo's children) must run
the code under test, not some other installed copy: the checkout goes first
on their PYTHONPATH.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
