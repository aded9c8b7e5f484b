"""hessian_trace (Hutchinson, Hutch++) and spectral_density (stochastic Lanczos quadrature) against exact traces
and moments of dense Hessians; subspace_overlap against its definition."""

import math

import pytest
import torch
from test_curvature_reference import MODELS, classification_batch, cross_entropy, dense_hessian, dense_operator

from hildtools.curvature import hessian_trace, spectral_density, subspace_overlap
from hildtools.curvature._random import rademacher_vector
from hildtools.curvature.density import lanczos_quadrature
from hildtools.curvature.trace import operator_trace


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("name", ["mlp", "bn_train"])
def test_trace_within_a_few_standard_errors(name, method):
    model, batch = MODELS[name](), classification_batch(name)
    exact = torch.trace(dense_hessian(model, cross_entropy, batch)).item()
    for seed in range(3):
        result = hessian_trace(model, cross_entropy, batch, num_samples=60, method=method, seed=seed)
        assert result.num_hvp == 60 and result.method == method
        assert abs(result.estimate - exact) <= 4 * result.standard_error


def decaying_operator(seed=0):
    """A spectrum decaying like i^-2 with a small negative part: the regime where Hutch++ shines."""
    spectrum = torch.cat([10.0 / torch.arange(1, 281, dtype=torch.float64) ** 2, -0.01 * torch.ones(20)])
    return dense_operator(spectrum, seed)[0]


def test_hutchplusplus_has_lower_variance_and_calibrated_standard_errors():
    matrix = decaying_operator()
    exact = torch.trace(matrix).item()
    spread = {}
    for method in ("hutchinson", "hutch++"):
        results = [
            operator_trace(lambda v: matrix @ v, 300, num_samples=30, method=method, seed=seed, dtype=torch.float64)
            for seed in range(40)
        ]
        estimates = torch.tensor([r.estimate for r in results])
        errors = torch.tensor([r.standard_error for r in results])
        spread[method] = estimates.std().item()
        assert abs(estimates.mean().item() - exact) <= 4 * spread[method] / math.sqrt(40)  # unbiased
        assert 0.6 < errors.mean().item() / spread[method] < 1.6  # reported errors match the real spread
    assert spread["hutch++"] < spread["hutchinson"] / 3


def test_exact_trace_of_a_rank_deficient_operator_with_hutchplusplus():
    """If the sketch captures the whole range (rank 3 <= num_samples / 3), Hutch++ is exact."""
    spectrum = torch.zeros(100, dtype=torch.float64)
    spectrum[:3] = torch.tensor([3.0, -1.0, 0.5])
    matrix = dense_operator(spectrum)[0]
    result = operator_trace(lambda v: matrix @ v, 100, num_samples=12, dtype=torch.float64)
    assert result.estimate == pytest.approx(2.5, abs=1e-10) and result.standard_error < 1e-10


def test_slq_moments_are_exact_quadratic_forms_of_each_probe():
    """Gauss quadrature with m nodes integrates degree < 2m exactly: sum_j tau_j theta_j^p = z^T H^p z / P."""
    matrix = decaying_operator(1)
    density = lanczos_quadrature(lambda v: matrix @ v, 300, num_probes=3, num_steps=10, seed=5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    for row in range(3):
        z = rademacher_vector(300, generator, torch.device("cpu"), torch.float64)
        for power in range(4):
            quadrature = (density.weights[row] * density.nodes[row] ** power).sum()
            exact = z @ torch.linalg.matrix_power(matrix, power) @ z / 300
            assert quadrature.item() == pytest.approx(exact.item(), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn_eval"])
def test_slq_moments_estimate_normalized_traces_of_powers(name):
    """moment(j) estimates tr(H^j)/P for j = 0, 1, 2 (j = 0 exactly: the weights sum to one per probe)."""
    model, batch = MODELS[name](), classification_batch(name)
    hessian = dense_hessian(model, cross_entropy, batch)
    size = hessian.shape[0]
    density = spectral_density(model, cross_entropy, batch, num_probes=20, num_steps=12, seed=0)
    assert density.num_hvp == 20 * 12 and density.moment(0) == pytest.approx(1.0, abs=1e-12)
    for power in (1, 2):
        per_probe = (density.weights * density.nodes**power).sum(1)
        error = per_probe.std().item() / math.sqrt(20)
        exact = torch.trace(torch.linalg.matrix_power(hessian, power)).item() / size
        assert abs(density.moment(power) - exact) <= 4 * error


def test_slq_on_an_exhausted_krylov_space_and_the_smoothed_density():
    """A rank-2 operator: the quadrature stops after the invariant subspace; nodes are the eigenvalues."""
    spectrum = torch.zeros(40, dtype=torch.float64)
    spectrum[:2] = torch.tensor([4.0, -2.0])
    matrix = dense_operator(spectrum)[0]
    density = lanczos_quadrature(lambda v: matrix @ v, 40, num_probes=2, num_steps=30, dtype=torch.float64)
    assert density.num_hvp < 2 * 30
    support = density.nodes[density.weights > 1e-12]
    assert torch.all(
        (support[:, None] - torch.tensor([4.0, -2.0, 0.0], dtype=torch.float64)).abs().min(1).values < 1e-8
    )
    grid, values = density.smooth(num_points=4001)
    assert torch.trapezoid(values, grid).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.trapezoid(values * grid, grid).item() == pytest.approx(density.moment(1), abs=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        density.smooth(sigma=0.0)


@pytest.mark.parametrize(
    "function, kwargs, name",
    [
        (hessian_trace, {"num_samples": 2}, "num_samples"),
        (hessian_trace, {"method": "exact"}, "method"),
        (hessian_trace, {"method": "hutchinson", "num_samples": 1}, "num_samples"),
        (hessian_trace, {"backend": "fd"}, "backend"),
        (spectral_density, {"num_probes": 0}, "num_probes"),
        (spectral_density, {"num_steps": 0}, "num_steps"),
    ],
)
def test_bad_arguments(function, kwargs, name):
    with pytest.raises(ValueError, match=name):
        function(MODELS["mlp"](), cross_entropy, classification_batch("mlp"), **kwargs)


def test_subspace_overlap():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(50, 4, generator=g, dtype=torch.float64)).Q
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64)).Q
    assert subspace_overlap(u, -u @ rotation) == pytest.approx(1.0)  # signs and rotations inside do not count
    v = torch.linalg.qr(torch.randn(50, 4, generator=g, dtype=torch.float64)).Q
    assert subspace_overlap(u, v) == pytest.approx(((u.T @ v) ** 2).sum().item() / 4)
    assert subspace_overlap(u[:, 0], u) == pytest.approx(1.0)  # a vector inside the span; k = min(1, 4)
    assert subspace_overlap(u[:, :2], u[:, 2:]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="rows"):
        subspace_overlap(u, v[:10])
