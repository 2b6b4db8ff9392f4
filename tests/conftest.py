"""Suite-wide settings."""

import os

import torch

# One torch thread: the sampler's reader threads take the other core, and on a busy 2-core machine two OpenMP threads
# spin against each other (a training step measured 10-20x slower with 2 threads under load than with 1).
torch.set_num_threads(1)
os.environ.setdefault("SCVI_SCALE_PROGRESS", "0")  # no progress bars in test logs
