"""The normalisation layers that keep running statistics, named by their public torch classes.

torch's common bases of these layers (``_NormBase``, ``_BatchNorm``) are private; ``tests/test_public_apis.py``
checks that these tuples cover every ``torch.nn`` subclass of them.
"""

from torch import nn

BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)
"""Batch normalisation: train mode normalises with the batch's statistics and updates the running ones."""

RUNNING_STAT_NORMS = BATCH_NORMS + (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)
"""Every layer with (optional, ``track_running_stats``) running-statistics buffers."""
