"""scikit-learn's digits (1,797 8x8 images, 10 classes; shipped inside scikit-learn, no download) as tensors."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as (N, 1, 8, 8) scaled to [0, 1], labels as int64."""
    from phenomena_common import require

    data = require("sklearn.datasets", "scikit-learn").load_digits()
    images = torch.tensor(data.images, dtype=dtype).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


def digits_loaders(batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Shuffled train and fixed validation loaders over a seeded split."""
    images, labels = digits_tensors()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(val_fraction * len(labels))
    val, train = order[:n_val], order[n_val:]
    train_loader = DataLoader(
        TensorDataset(images[train], labels[train]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(TensorDataset(images[val], labels[val]), batch_size=256)
    return train_loader, val_loader
