"""Lanczos on vectors split across 2 gloo ranks: the float64 recurrence with fp32 products and basis storage, every
inner product all-reduced through ``inner=``. Checked against the known spectrum of a dense operator: both ranks hold
bitwise the same eigenvalues, residuals, error bounds and product counts, fp32 products still reach 1e-6, the bounds
hold, and a warm start from the local shards of the previous eigenvectors works."""

import torch
import torch.distributed as dist
from ddp_utils import run_ranks
from test_curvature_eigenpairs import clustered_operator

from hildtools.curvature.lanczos import lanczos
from hildtools.distributed import sharded_inner

SIZES = (600, 400)  # unequal shards of the 1000 entries


def lanczos_on_rank(rank, world_size):
    matrix, _ = clustered_operator(0)
    matrix = matrix.float()
    start = sum(SIZES[:rank])
    rows = matrix[start : start + SIZES[rank]]
    dtypes = set()

    def matvec(local):  # fp32 products: the local rows times the whole vector (gathered here, only for the test)
        assert local.dtype == torch.float32
        whole = torch.zeros(sum(SIZES), dtype=local.dtype)
        whole[start : start + SIZES[rank]] = local
        dist.all_reduce(whole)
        return rows @ whole

    def inner(a, b):
        dtypes.update({a.dtype, b.dtype})
        return sharded_inner(a, b)

    cold = lanczos(matvec, SIZES[rank], k=3, tol=1e-6, max_iter=300, dtype=torch.float32, inner=inner)
    warm = lanczos(
        matvec,
        SIZES[rank],
        k=3,
        tol=1e-6,
        max_iter=300,
        dtype=torch.float32,
        inner=inner,
        init=cold.eigenvectors,
        seed=1,
    )
    return [
        (r.eigenvalues, r.residuals, r.error_bounds, r.bound_kinds, r.num_hvp, r.converged, r.eigenvectors)
        for r in (cold, warm)
    ], dtypes


def test_sharded_lanczos_in_float64_agrees_across_ranks_and_with_the_spectrum():
    (first, dtypes), (second, other_dtypes) = run_ranks(lanczos_on_rank, timeout=120)
    # the recurrence's inner products on float64 vectors, re-orthogonalisation against the basis stored in float32
    assert dtypes == other_dtypes == {torch.float64, torch.float32}
    _, spectrum = clustered_operator(0)
    for mine, theirs in zip(first, second):
        values, residuals, bounds, kinds, num_hvp, converged, vectors = mine
        assert all(torch.equal(a, b) for a, b in zip(mine[:3], theirs[:3]))
        assert (kinds, num_hvp, converged) == theirs[3:6]
        assert converged and vectors.shape == (SIZES[0], 3) and theirs[6].shape == (SIZES[1], 3)
        assert vectors.dtype == torch.float32
        assert torch.all((values - spectrum[:3]).abs() <= 1e-6 * spectrum[0])
        assert torch.all((values - spectrum[:3]).abs() <= bounds)
        whole = torch.cat([vectors, theirs[6]]).double()
        assert torch.allclose(whole.T @ whole, torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert first[1][4] < first[0][4]  # the warm start from the local shards saves products
