"""
C{python -m caps.bench}: see L{caps.bench}.
"""

import sys

from caps.bench import main

main(sys.argv[1:])
