"""Test-suite setup for the independent correctness tests of abkd (tests/reference.py and friends)."""
import os
import sys

# make `import reference` work regardless of pytest's import mode / rootdir
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
