"""Random probe vectors from a private CPU generator (the global RNG is never used), moved to the device.

Drawing on the CPU makes results identical on every device and every rank that uses the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_vector(size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal entries."""
    return torch.randn(size, generator=generator, dtype=torch.float64).to(device, dtype)


def rademacher_vector(size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Independent +-1 entries (``E[z z^T] = I``, the lowest-variance Hutchinson probe)."""
    return (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(device, dtype)
