"""Shared test setup: tests/ on sys.path for the helper modules, deterministic CPU torch."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Tiny models on a 2-core machine: extra threads only add contention (a tiny forward took 1.8 s
# with default threads under load versus 0.03 s with one).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests even if an earlier test changed the count (bit-exact
    comparisons of reductions depend on it); the count is restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
