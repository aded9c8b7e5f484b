"""Kernel metrics against their formulas written out with explicit target and centering matrices (numpy, fp64)."""

import numpy as np
import pytest
import torch
from torch import nn

from hildtools.metrics import (
    center_kernel,
    empirical_ntk,
    kernel_alignment,
    kernel_alignment_between,
    kernel_effective_rank,
    kernel_eigenvalues,
    kernel_trace,
    relative_change,
    target_alignment_numerator,
)

OUTPUTS = ["sum", "mean", "index", "projection", "full"]


def random_psd(m, seed=0, rank=None):
    generator = np.random.default_rng(seed)
    factor = generator.standard_normal((m, rank or m))
    return factor @ factor.T


def one_hot(labels, classes):
    return np.eye(classes)[labels]


def reference_alignment(kernel, target, centered, outputs=1):
    """<K, T>/(||K|| ||T||) with T given explicitly; centering by the matrix H (x) I_C."""
    if centered:
        n = kernel.shape[0] // outputs
        h = np.kron(np.eye(n) - np.ones((n, n)) / n, np.eye(outputs))
        kernel, target = h @ kernel @ h, h @ target @ h
    return (kernel * target).sum() / (np.linalg.norm(kernel) * np.linalg.norm(target))


@pytest.mark.parametrize("centered", [False, True])
def test_alignment_against_explicit_targets(centered):
    kernel = random_psd(8)
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 0])
    y = np.random.default_rng(1).standard_normal(8)
    matrix = np.random.default_rng(2).standard_normal((8, 3))
    cases = [
        (torch.tensor(labels), one_hot(labels, 3) @ one_hot(labels, 3).T),
        (torch.tensor(y), np.outer(y, y)),
        (torch.tensor(matrix), matrix @ matrix.T),
    ]
    for targets, explicit in cases:
        expected = reference_alignment(kernel, explicit, centered)
        assert kernel_alignment(torch.tensor(kernel), targets, centered=centered).item() == pytest.approx(
            expected, rel=1e-12
        )


@pytest.mark.parametrize("centered", [False, True])
def test_full_kernel_alignment_uses_the_flattened_targets(centered):
    kernel = random_psd(12)  # n = 4 examples, C = 3 outputs, rows ordered i*C + a
    labels = np.array([2, 0, 1, 2])
    flat = one_hot(labels, 3).reshape(-1)
    expected = reference_alignment(kernel, np.outer(flat, flat), centered, outputs=3)
    actual = kernel_alignment(torch.tensor(kernel), torch.tensor(labels), centered=centered)
    assert actual.item() == pytest.approx(expected, rel=1e-12)
    matrix = np.random.default_rng(3).standard_normal((4, 3))
    flat = matrix.reshape(-1)
    expected = reference_alignment(kernel, np.outer(flat, flat), centered, outputs=3)
    assert kernel_alignment(torch.tensor(kernel), torch.tensor(matrix), centered=centered).item() == pytest.approx(
        expected, rel=1e-12
    )


def test_target_kernel_has_alignment_one():
    y = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    assert kernel_alignment(torch.outer(y, y), y).item() == pytest.approx(1, abs=1e-15)
    labels = torch.tensor([0, 2, 1, 2, 0])
    target = nn.functional.one_hot(labels).double()
    assert kernel_alignment(target @ target.T, labels).item() == pytest.approx(1, abs=1e-15)
    flat = target.reshape(-1)
    assert kernel_alignment(torch.outer(flat, flat), labels).item() == pytest.approx(1, abs=1e-15)
    centered = y - y.mean()
    assert kernel_alignment(torch.outer(centered, centered), y, centered=True).item() == pytest.approx(1, abs=1e-15)


@pytest.mark.parametrize("scale", [1e-8, 0.3, 7.0, 1e8])
@pytest.mark.parametrize("centered", [False, True])
def test_alignment_is_invariant_to_kernel_scale_and_permutation(scale, centered):
    kernel = torch.tensor(random_psd(9, seed=4))
    labels = torch.tensor([0, 1, 1, 0, 2, 2, 1, 0, 2])
    base = kernel_alignment(kernel, labels, centered=centered)
    assert kernel_alignment(scale * kernel, labels, centered=centered).item() == pytest.approx(base.item(), rel=1e-12)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    permuted = kernel_alignment(kernel[order][:, order], labels[order], centered=centered)
    assert permuted.item() == pytest.approx(base.item(), rel=1e-12)
    assert kernel_alignment_between(scale * kernel, kernel, centered=centered).item() == pytest.approx(1, rel=1e-12)


def test_kernel_kernel_metrics_against_formulas():
    first, second = random_psd(7, seed=5), random_psd(7, seed=6)
    expected = (first * second).sum() / (np.linalg.norm(first) * np.linalg.norm(second))
    a, b = torch.tensor(first), torch.tensor(second)
    assert kernel_alignment_between(a, b).item() == pytest.approx(expected, rel=1e-12)
    h = np.eye(7) - 1 / 7
    expected_centered = reference_alignment(first, second, centered=True)
    assert kernel_alignment_between(a, b, centered=True).item() == pytest.approx(expected_centered, rel=1e-12)
    torch.testing.assert_close(center_kernel(a), torch.tensor(h @ first @ h), rtol=1e-12, atol=1e-12)
    change = np.linalg.norm(first - second) / np.linalg.norm(second)
    assert relative_change(a, b).item() == pytest.approx(change, rel=1e-12)
    assert relative_change(b, b).item() == 0
    assert kernel_trace(a).item() == pytest.approx(np.trace(first), rel=1e-14)


def test_spectrum_and_effective_rank():
    kernel = random_psd(10, seed=7, rank=4)
    values = np.sort(np.linalg.eigvalsh(kernel))[::-1]
    torch.testing.assert_close(
        kernel_eigenvalues(torch.tensor(kernel)), torch.tensor(values.copy()), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(kernel_eigenvalues(torch.tensor(kernel), k=3), torch.tensor(values[:3].copy()))
    p = np.clip(values, 0, None)
    p = p[p > 0] / p.sum()
    expected = np.exp(-(p * np.log(p)).sum())
    assert kernel_effective_rank(torch.tensor(kernel)).item() == pytest.approx(expected, rel=1e-9)
    assert kernel_effective_rank(torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0]))).item() == pytest.approx(3)
    assert kernel_effective_rank(torch.zeros(3, 3)).item() == 0


def test_degenerate_alignments_are_nan():
    assert torch.isnan(kernel_alignment(torch.zeros(3, 3), torch.tensor([1.0, 2.0, 3.0])))
    assert torch.isnan(kernel_alignment(torch.eye(3), torch.tensor([1, 1, 1]), centered=True))  # constant labels
    assert torch.isnan(relative_change(torch.eye(2), torch.zeros(2, 2)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: kernel_alignment(torch.ones(3, 4), torch.ones(3)), ValueError, "square"),
        (lambda: kernel_alignment(torch.eye(5), torch.ones(3)), ValueError, "neither n = 3"),
        (lambda: kernel_alignment(torch.eye(6), torch.ones(3, 3)), ValueError, r"needs \(n, 2\) targets"),
        (lambda: kernel_alignment(torch.eye(3), torch.tensor([0, -1, 2])), ValueError, "class indices >= 0"),
        (lambda: kernel_alignment(torch.eye(3), torch.tensor([True, False, True])), ValueError, "y must be"),
        (lambda: kernel_alignment(torch.eye(6), torch.tensor([0, 1, 2])), ValueError, "out of range for 2 classes"),
        (lambda: kernel_alignment_between(torch.eye(3), torch.eye(4)), ValueError, "same shape"),
        (lambda: center_kernel(torch.eye(5), num_outputs=2), ValueError, "does not divide"),
        (lambda: kernel_eigenvalues(torch.eye(3), k=0), ValueError, "k must be an integer >= 1"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("centered", [False, True])
def test_numerator_without_the_kernel_equals_the_kernel_form(output, centered):
    model = mlp()
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 2, 1, 1])
    targets = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    index = 2 if output == "index" else None
    kernel = empirical_ntk(model, x, output=output, output_index=index, seed=4)
    for y, matrix in ((labels, nn.functional.one_hot(labels, 3).double()), (targets, targets)):
        if centered:
            matrix = matrix - matrix.mean(0)
        expected = (
            matrix.reshape(-1) @ kernel @ matrix.reshape(-1) if output == "full" else (matrix * (kernel @ matrix)).sum()
        )
        numerator = target_alignment_numerator(
            model, x, y, output=output, output_index=index, centered=centered, seed=4, chunk_size=2
        )
        assert numerator.item() == pytest.approx(expected.item(), rel=1e-10)


def test_numerator_for_a_scalar_output_is_the_squared_gradient_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    gradients = torch.autograd.grad((model(x)[:, 0] * y).sum(), list(model.parameters()))
    expected = sum(g.square().sum() for g in gradients)
    assert target_alignment_numerator(model, x, y).item() == pytest.approx(expected.item(), rel=1e-12)
    kernel = empirical_ntk(model, x)
    assert (y @ kernel @ y).item() == pytest.approx(expected.item(), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_numerator_bad_targets():
    with pytest.raises(ValueError, match="y has 2 entries for 3 examples"):
        target_alignment_numerator(mlp(), torch.randn(3, 4, dtype=torch.float64), torch.ones(2))
    with pytest.raises(ValueError, match=r"needs \(n, 3\) targets"):
        target_alignment_numerator(mlp(), torch.randn(3, 4, dtype=torch.float64), torch.ones(3), output="full")
