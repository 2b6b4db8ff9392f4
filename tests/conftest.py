"""Suite-wide settings."""

import os

import pytest
import torch

# One torch thread: the sampler's reader threads take the other core, and on a busy 2-core machine two OpenMP threads
# spin against each other (a training step measured 10-20x slower with 2 threads under load than with 1).
torch.set_num_threads(1)
os.environ.setdefault("SCVI_SCALE_PROGRESS", "0")  # no progress bars in test logs


@pytest.fixture(autouse=True)
def torch_threads_unchanged(request):
    """A test, or the code it runs, that leaves torch's thread count changed fails here: later tests in the process
    would run at another thread count, and float sums (the kill-and-resume tests' subprocesses run at one thread)
    would round otherwise."""
    yield
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
        pytest.fail(f"{request.node.nodeid} left torch at {threads} threads (the suite runs at 1)", pytrace=False)
