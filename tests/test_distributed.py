"""Collectives agree across ranks; a NaN on one rank is seen by all (so no rank is left waiting)."""

import torch
from ddp_utils import run_ranks

from hildtools.distributed import all_finite, all_reduce_max, all_reduce_mean, all_reduce_weighted_mean


def collectives(rank, world_size):
    local = torch.tensor([1.0, 2.0]) * (rank + 1)
    nan_on_rank1 = torch.tensor(float("nan") if rank == 1 else 0.0)
    return {
        "mean": all_reduce_mean(local),
        "weighted": all_reduce_weighted_mean(local, weight=3 if rank == 0 else 1),
        "finite_everywhere": all_finite(torch.tensor(1.0)),
        "finite_with_nan": all_finite(nan_on_rank1),
        "local_untouched": local,
        "max": all_reduce_max(5 - 3 * rank),
    }


def test_collectives_on_two_ranks():
    results = run_ranks(collectives)
    for rank, out in enumerate(results):
        assert torch.allclose(out["mean"], torch.tensor([1.5, 3.0]))
        # (3 * [1, 2] + 1 * [2, 4]) / 4
        assert torch.allclose(out["weighted"], torch.tensor([1.25, 2.5]))
        assert out["finite_everywhere"] is True and out["finite_with_nan"] is False
        assert out["max"] == 5
        assert torch.equal(out["local_untouched"], torch.tensor([1.0, 2.0]) * (rank + 1))


def test_single_process_is_a_no_op():
    t = torch.tensor([1.0])
    assert all_reduce_mean(t) is t and all_reduce_weighted_mean(t, 5) is t
    assert all_finite(t) and not all_finite(torch.tensor([float("inf")]))
    assert all_reduce_max(-2) == -2
