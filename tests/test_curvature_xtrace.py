"""XTrace against the dense trace: exact on low-rank operators, unbiased and within its error on network Hessians,
lower error than Hutch++ at the same number of products; and HessianOperator.matmat (block products) against the
dense Hessian."""

import pytest
import torch
from test_curvature_reference import (
    MODELS,
    classification_batch,
    cross_entropy,
    dense_hessian,
    dense_operator,
)

from hildtools.curvature import HessianOperator, hessian_trace
from hildtools.curvature import hvp as hvp_module
from hildtools.curvature.trace import operator_trace


def test_xtrace_is_exact_on_an_operator_of_rank_below_the_sketch():
    spectrum = torch.zeros(300, dtype=torch.float64)
    spectrum[:5] = torch.tensor([4.0, -3.0, 2.0, 1.0, 0.5])
    matrix, _ = dense_operator(spectrum)
    result = operator_trace(matrix.__matmul__, 300, num_samples=16, method="xtrace", dtype=torch.float64)
    assert result.estimate == pytest.approx(4.5, abs=1e-10) and result.num_hvp == 16


@pytest.mark.parametrize("name", ["mlp", "bn_train"])
def test_xtrace_on_network_hessians_against_the_dense_trace(name):
    model, batch = MODELS[name](), classification_batch(name)
    exact = torch.trace(dense_hessian(model, cross_entropy, batch)).item()
    result = hessian_trace(model, cross_entropy, batch, num_samples=41)
    assert result.method == "xtrace" and result.num_hvp == 40
    assert abs(result.estimate - exact) <= max(4 * result.standard_error, 0.02 * abs(exact))


def test_xtrace_beats_hutchplusplus_at_equal_products_and_is_unbiased():
    """A decaying spectrum over a noisy bulk: RMS errors over 40 seeds at 60 products."""
    g = torch.Generator().manual_seed(0)
    spectrum = torch.cat(
        [10.0 / torch.arange(1, 21, dtype=torch.float64), 0.02 * torch.randn(480, generator=g, dtype=torch.float64)]
    )
    matrix, _ = dense_operator(spectrum)
    exact = spectrum.sum().item()
    errors = {}
    for method in ("xtrace", "hutch++"):
        runs = [
            operator_trace(
                matrix.__matmul__, 500, num_samples=60, method=method, seed=seed, dtype=torch.float64
            ).estimate
            - exact
            for seed in range(40)
        ]
        errors[method] = torch.tensor(runs)
    rms = {method: e.pow(2).mean().sqrt().item() for method, e in errors.items()}
    assert rms["xtrace"] < 0.7 * rms["hutch++"]
    assert abs(errors["xtrace"].mean().item()) <= 3 * errors["xtrace"].std().item() / 40**0.5


@pytest.mark.parametrize("block_size", [None, 1, 5])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_block_products_equal_the_dense_hessian_times_the_block(name, block_size):
    """Measured (None), single (1) and batched (5) block products."""
    model, batch = MODELS[name](), classification_batch(name)
    hessian = dense_hessian(model, cross_entropy, batch)
    operator = HessianOperator(model, cross_entropy, batch)
    operator.block_size = block_size
    block = torch.randn(operator.size, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(operator.matmat(block), hessian @ block, rtol=1e-10, atol=1e-12)
    assert operator.num_matvecs == 5
    assert operator.block_size in ((1, 16) if block_size is None else (block_size,))  # no fallback to single products
    scale = torch.rand(operator.size, dtype=torch.float64) + 0.5
    preconditioned = HessianOperator(model, cross_entropy, batch, preconditioner=scale)
    preconditioned.block_size = block_size
    expected = scale[:, None] * (hessian @ (scale[:, None] * block))
    assert torch.allclose(preconditioned.matmat(block), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batched_faster", [True, False])
def test_block_size_is_the_faster_of_single_and_batched_products(monkeypatch, batched_faster):
    """The first block call keeps whichever of one single product and one batched block took less per vector."""
    seconds = iter([1.0, 10.0 if batched_faster else 20.0])  # single product, then the batched block of 16

    def fake_timed(function, argument):
        return function(argument), next(seconds)

    monkeypatch.setattr(hvp_module, "_timed", fake_timed)
    model, batch = MODELS["mlp"](), classification_batch("mlp")
    operator = HessianOperator(model, cross_entropy, batch)
    block = torch.randn(operator.size, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    product = operator.matmat(block)  # 1 single, 16 batched, then 3 by the chosen way
    assert operator.block_size == (16 if batched_faster else 1) and operator.num_matvecs == 20
    assert torch.allclose(product, dense_hessian(model, cross_entropy, batch) @ block, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"method": "xtrace", "num_samples": 3}, {"method": "cg"}])
def test_bad_trace_arguments(kwargs):
    with pytest.raises(ValueError, match="num_samples" if "num_samples" in kwargs else "method"):
        hessian_trace(MODELS["mlp"](), cross_entropy, classification_batch("mlp"), **kwargs)
