"""Shared pytest setup: ``tests/_helpers.py`` importable as ``_helpers``; one torch thread per worker."""

import sys
from pathlib import Path

import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# pytest-xdist runs one worker per core; torch's own intra-op threads on top would only contend.
torch.set_num_threads(1)
