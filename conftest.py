"""Workspace-wide test settings."""

import torch

# The suite runs many tiny tensor ops; on a 2-core machine, torch's thread pool costs far
# more than it saves on them (a [2, 12, 32] linear: ~16 ms with 2 busy threads, µs with 1).
torch.set_num_threads(1)
