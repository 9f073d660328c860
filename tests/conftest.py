"""Test-suite setup for the independent correctness tests of abkd (tests/reference.py and friends)."""
import os
import sys

# make `import reference` work regardless of pytest's import mode / rootdir
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Triton kernels run on CPU tensors under the interpreter; the flag must be set before triton compiles anything.
import torch as _torch
if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest as _pytest


@_pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process: a Trainer or Accelerator made by one test (e.g. with
    mixed_precision='no') would make a later Accelerator(mixed_precision='bf16') fail. Reset it around every test."""
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
