"""hessian_eigenpairs and Lanczos: top-k eigenpairs against the dense Hessian (fp64 to 1e-8, fp32 to 1e-4),
largest algebraic (not magnitude), smallest eigenvalue, residual-based accuracy on clustered spectra, warm
starts, basis offload, PyHessian parity, no side effects, bad input."""

import copy
import functools
import importlib
import math

import pytest
import torch
from test_curvature_reference import (
    MODELS,
    classification_batch,
    cross_entropy,
    dense_hessian,
    dense_operator,
    mlp,
)
from torch import nn

from hildtools.curvature import NonFiniteLossError, hessian_eigenpairs, subspace_overlap
from hildtools.curvature.lanczos import lanczos

lanczos_module = importlib.import_module("hildtools.curvature.lanczos")


def exact_top(hessian, k):
    values, vectors = torch.linalg.eigh(hessian)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_top5_in_fp64_to_1e8(name):
    model, batch = MODELS[name](), classification_batch(name)
    values, vectors = exact_top(dense_hessian(model, cross_entropy, batch), 5)
    result = hessian_eigenpairs(model, cross_entropy, batch, k=5, tol=1e-9)
    assert result.converged and result.eigenvalues.dtype == torch.float64
    assert torch.allclose(result.eigenvalues, values, rtol=1e-8, atol=0)
    assert subspace_overlap(result.eigenvectors, vectors) >= 0.999
    assert torch.all(result.residuals <= 1e-9 * result.eigenvalues.abs())
    vals, vecs = result  # unpacks as (values, vectors)
    assert vals is result.eigenvalues and vecs.shape == (vectors.shape[0], 5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_top5_in_fp32_to_1e4(name):
    model, batch = MODELS[name](), classification_batch(name)
    values, vectors = exact_top(dense_hessian(model, cross_entropy, batch), 5)
    model32 = MODELS[name](torch.float32)
    vals, vecs = hessian_eigenpairs(model32, cross_entropy, (batch[0].float(), batch[1]), k=5, tol=1e-5)
    assert vecs.dtype == torch.float32
    assert torch.allclose(vals, values, rtol=1e-4, atol=0)
    assert subspace_overlap(vecs, vectors) >= 0.999


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_backends_agree(backend):
    model, batch = MODELS["bn_train"](), classification_batch("bn_train")
    values, _ = exact_top(dense_hessian(model, cross_entropy, batch), 3)
    vals, _ = hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-9, backend=backend)
    assert torch.allclose(vals, values, rtol=1e-8)


def test_largest_algebraic_not_largest_magnitude():
    """A spectrum whose most negative eigenvalue dominates in magnitude: the top eigenvalue is still the largest."""
    spectrum = torch.cat([torch.tensor([-10.0, -9.0]), torch.linspace(-1, 1, 196), torch.tensor([2.0, 1.5])])
    matrix, _ = dense_operator(spectrum)
    result = lanczos(lambda v: matrix @ v, 200, k=2, tol=1e-10, dtype=torch.float64, smallest=True)
    assert torch.allclose(result.eigenvalues, torch.tensor([2.0, 1.5], dtype=torch.float64), rtol=1e-9)
    assert result.smallest_eigenvalue.item() == pytest.approx(-10.0, rel=1e-9)


def test_largest_algebraic_on_a_model_dominated_by_negative_curvature():
    """MSE towards far-away targets at a saddle-like point: |lambda_min| > lambda_max for this model."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    batch = (x, 50 * torch.ones(20, 1, dtype=torch.float64))

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    exact = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batch))
    assert -exact[0] > exact[-1] > 0  # the premise: the most negative eigenvalue dominates in magnitude
    result = hessian_eigenpairs(model, loss_fn, batch, k=1, tol=1e-10, smallest=True)
    assert result.eigenvalues[0].item() == pytest.approx(exact[-1].item(), rel=1e-8)
    assert result.smallest_eigenvalue.item() == pytest.approx(exact[0].item(), rel=1e-8)
    hessian = dense_hessian(model, loss_fn, batch)
    vector = result.smallest_eigenvector
    assert (hessian @ vector - exact[0] * vector).norm() <= 1e-7 * exact.abs().max()


def test_smallest_eigenvalue_of_a_network():
    model, batch = MODELS["cnn"](), classification_batch("cnn")
    exact = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch))
    result = hessian_eigenpairs(model, cross_entropy, batch, k=2, tol=1e-8, smallest=True)
    assert result.smallest_eigenvalue.item() == pytest.approx(exact[0].item(), rel=1e-6)
    assert result.smallest_residual <= 1e-8 * exact.abs().max() * 1.0001


EOS_TOP = (10.6645, 10.4050, 10.2440, 10.2258, 9.9654, 9.7967, 9.4434)
"""Top eigenvalues of a tanh MLP on digits at the edge of stability (benchmarks/bench_hessian.py): lambda_3 and
lambda_4 are 0.18% apart, so a Ritz vector mixing them passes a 1e-3 residual test while lambda_4 is missed."""


@functools.cache
def clustered_operator(seed=0, top=(5.0, 4.95, 4.925, 4.9, 4.875, 4.85, 4.8)):
    """Edge-of-stability-like spectrum: clustered top eigenvalues, a bulk near zero, a negative tail."""
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor(top, dtype=torch.float64)
    bulk = torch.randn(700, generator=g, dtype=torch.float64).abs() * 0.05
    spectrum = torch.cat([top, bulk, -0.2 * torch.rand(293, generator=g, dtype=torch.float64)])
    matrix, _ = dense_operator(spectrum, seed)
    return matrix, spectrum.sort(descending=True).values


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("k", [1, 5])
def test_residual_stop_bounds_the_distance_to_the_spectrum(tol, k):
    """The promise: every returned value is within tol * |value| of an eigenvalue (the residual bound), the i-th
    Ritz value never exceeds the i-th eigenvalue (interlacing), and the reported residuals are the true ones."""
    for seed in range(3):
        matrix, spectrum = clustered_operator(seed)
        result = lanczos(lambda v: matrix @ v, 1000, k=k, tol=tol, max_iter=400, seed=seed, dtype=torch.float64)
        assert result.converged and result.num_hvp < 60
        distance = (result.eigenvalues[:, None] - spectrum[None, :]).abs().min(1).values
        assert torch.all(distance <= tol * result.eigenvalues.abs())
        assert torch.all(result.eigenvalues <= spectrum[:k] + 1e-12)
        true_residuals = (matrix @ result.eigenvectors - result.eigenvectors * result.eigenvalues).norm(dim=0)
        assert torch.allclose(true_residuals, result.residuals, rtol=1e-6, atol=1e-12)


def test_near_degenerate_pair_is_not_merged_into_one_ritz_value():
    """The confirmation steps after the first passed residual test catch the missing eigenvalue."""
    for seed in range(12):
        matrix, spectrum = clustered_operator(seed, EOS_TOP)
        result = lanczos(lambda v: matrix @ v, 1000, k=5, tol=1e-3, seed=seed, dtype=torch.float64)
        assert torch.all((result.eigenvalues - spectrum[:5]).abs() <= 1e-3 * spectrum[:5])


@pytest.mark.parametrize("confirm", [0.0, 0.25, 1.0])
def test_confirm_stops_that_fraction_of_steps_after_the_residual_test_first_passes(confirm):
    """``confirm=0`` stops at the first step whose top-k residuals meet ``tol`` (as ARPACK does); otherwise the run
    goes on ``ceil(confirm * m)`` steps (more only if a value moved)."""
    matrix, _ = clustered_operator(0)
    start = lanczos_module.start_vector(1000, None, torch.Generator().manual_seed(0), torch.device("cpu"))
    process = lanczos_module.LanczosProcess(matrix.__matmul__, start, dtype=torch.float64)
    while True:  # the first step at which the residual test passes, by hand
        beta = process.step()
        theta, coefficients = torch.linalg.eigh(process.tridiagonal())
        if bool((beta * coefficients[-1, -3:].abs() <= 1e-3 * theta[-3:].abs()).all()):
            break
    result = lanczos(matrix.__matmul__, 1000, k=3, tol=1e-3, dtype=torch.float64, confirm=confirm)
    assert result.num_hvp >= process.length + math.ceil(confirm * process.length)
    assert confirm > 0 or result.num_hvp == process.length


@pytest.mark.parametrize("k", [1, 5])
def test_tolerance_below_the_gaps_gives_the_top_eigenvalues_to_tol_squared(k):
    """With tol below the relative gaps (0.2-1% here), the values are the top k, and (Rayleigh-Ritz) their error is
    of order residual^2 / gap, far below tol."""
    for seed in range(5):
        matrix, spectrum = clustered_operator(seed)
        result = lanczos(lambda v: matrix @ v, 1000, k=k, tol=1e-4, max_iter=400, seed=seed, dtype=torch.float64)
        assert torch.all((result.eigenvalues - spectrum[:k]).abs() <= 1e-6 * spectrum[:k])


def test_warm_start_needs_fewer_products_than_a_cold_start():
    """Eigenvectors of a perturbed problem (a few SGD steps later) start the next run far ahead."""
    model, batch = mlp(), classification_batch("mlp")
    before = hessian_eigenpairs(model, cross_entropy, batch, k=5, tol=1e-6)
    moved = copy.deepcopy(model)
    optimizer = torch.optim.SGD(moved.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        cross_entropy(moved, batch).backward()
        optimizer.step()
    cold = hessian_eigenpairs(moved, cross_entropy, batch, k=5, tol=1e-6)
    warm = hessian_eigenpairs(moved, cross_entropy, batch, k=5, tol=1e-6, init=before.eigenvectors)
    assert warm.num_hvp < cold.num_hvp
    assert torch.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-6)


def test_warm_start_finds_a_new_top_direction_outside_the_previous_span():
    spectrum = torch.linspace(0, 1, 300, dtype=torch.float64)
    matrix, vectors = dense_operator(spectrum)
    stale = vectors[:, 100:103]  # orthogonal to the true top eigenvectors
    result = lanczos(lambda v: matrix @ v, 300, k=3, tol=1e-8, init=stale, dtype=torch.float64)
    assert torch.allclose(result.eigenvalues, spectrum.flip(0)[:3], rtol=1e-7)


@pytest.mark.parametrize("partial", [True, False])
def test_partial_reorthogonalization_keeps_the_basis_orthonormal_with_fewer_passes(monkeypatch, partial):
    """fp32 products, 80 steps on a clustered spectrum: the orthogonality estimates trigger full passes over the
    basis only at some steps (73 of 80 here; 8 of 25 on a 1M-parameter MLP Hessian), yet the basis stays
    orthonormal to ~eps^0.75 and the top values match the spectrum; with the estimates ignored (no pass ever),
    orthogonality is lost as the top values converge."""
    if not partial:
        monkeypatch.setattr(lanczos_module, "SEMI_ORTHOGONALITY", -1.0)  # threshold eps^-1: never re-orthogonalise
    matrix, spectrum = clustered_operator(0)
    matrix = matrix.float()
    start = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    process = lanczos_module.LanczosProcess(lambda v: matrix @ v, start, dtype=torch.float32)
    for _ in range(80):
        process.step()
    basis = torch.cat(process._stored())
    loss = (basis @ basis.T - torch.eye(80, dtype=torch.float64)).abs().max().item()
    if partial:
        assert 0 < process.reorthogonalizations < 80 and loss < 1e-5
        top = torch.linalg.eigvalsh(process.tridiagonal()).flip(0)[:3]
        assert torch.allclose(top, spectrum[:3], rtol=1e-6)
    else:
        assert process.reorthogonalizations == 0 and loss > 1e-2


def test_basis_offloaded_to_cpu_equals_basis_on_device():
    model, batch = mlp(), classification_batch("mlp")
    on_device = hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-8)
    offloaded = hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-8, basis_device="cpu")
    assert torch.equal(on_device.eigenvalues, offloaded.eigenvalues)
    assert torch.equal(on_device.eigenvectors, offloaded.eigenvectors)


def test_invariant_subspaces_and_exact_degeneracy():
    """A rank-3 operator (Lanczos breaks down after 3 steps) with a doubly degenerate top eigenvalue."""
    spectrum = torch.zeros(50, dtype=torch.float64)
    spectrum[:3] = torch.tensor([2.0, 2.0, 1.0])
    matrix, vectors = dense_operator(spectrum)
    result = lanczos(lambda v: matrix @ v, 50, k=4, tol=1e-8, dtype=torch.float64)
    assert result.converged
    assert torch.allclose(result.eigenvalues, torch.tensor([2.0, 2.0, 1.0, 0.0], dtype=torch.float64), atol=1e-10)
    assert subspace_overlap(result.eigenvectors[:, :2], vectors[:, :2]) == pytest.approx(1.0, abs=1e-10)


def test_zero_hessian():
    model = nn.Linear(3, 1).double()
    result = hessian_eigenpairs(model, lambda m, b: m(b).sum(), torch.randn(5, 3, dtype=torch.float64), k=2)
    assert result.converged and torch.count_nonzero(result.eigenvalues) == 0


def test_preconditioned_sharpness_equals_the_eigenvalue_of_p_inverse_h():
    """lambda_1(S H S) with s = P^{-1/2} equals the top eigenvalue of the non-symmetric P^{-1} H."""
    model, batch = mlp(), classification_batch("mlp")
    hessian = dense_hessian(model, cross_entropy, batch)
    p_diag = torch.rand(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10 + 0.1
    expected = torch.linalg.eigvals(hessian / p_diag[:, None]).real.max()
    result = hessian_eigenpairs(model, cross_entropy, batch, k=1, tol=1e-10, preconditioner=p_diag.rsqrt())
    assert result.eigenvalues[0].item() == pytest.approx(expected.item(), rel=1e-8)


def test_no_side_effects():
    torch.manual_seed(0)
    model = MODELS["bn_train"]()
    batch = classification_batch("bn_train")
    cross_entropy(model, batch).backward()
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    hessian_eigenpairs(model, cross_entropy, batch, k=3, smallest=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes


def test_seeds_are_private_and_reproducible():
    model, batch = mlp(), classification_batch("mlp")
    a = hessian_eigenpairs(model, cross_entropy, batch, k=2, seed=3)
    torch.manual_seed(123)
    b = hessian_eigenpairs(model, cross_entropy, batch, k=2, seed=3)
    assert torch.equal(a.eigenvectors, b.eigenvectors)


def test_max_iter_caps_the_products_and_reports_non_convergence():
    model, batch = mlp(), classification_batch("mlp")
    result = hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-12, max_iter=5)
    assert result.num_hvp == 5 and not result.converged


def test_non_finite_loss():
    with pytest.raises(NonFiniteLossError):
        hessian_eigenpairs(mlp(), lambda m, b: cross_entropy(m, b) / 0.0 * 0.0, classification_batch("mlp"))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"k": 1.5}, "k"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"backend": "power"}, "backend"),
        ({"k": 3, "max_iter": 2}, "max_iter"),
        ({"k": 10**6}, "k"),
        ({"init": torch.ones(7)}, "init"),
        ({"backend": "pyhessian", "smallest": True}, "smallest"),
        ({"confirm": -0.1}, "confirm"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        hessian_eigenpairs(mlp(), cross_entropy, classification_batch("mlp"), **kwargs)


def test_pyhessian_parity_on_an_eval_mode_model():
    """Same model and batch, PyHessian (power iteration, cuda=False, tol=1e-6, maxIter=1000) vs ours: top
    eigenvalue to 1e-3 relative; and PyHessian's side effects (eval mode, .grad, global RNG) are undone."""
    pytest.importorskip("pyhessian")
    model = MODELS["bn_eval"](torch.float32)
    batch = classification_batch("bn_eval", dtype=torch.float32)
    exact = torch.linalg.eigvalsh(dense_hessian(MODELS["bn_eval"](), cross_entropy, classification_batch("bn_eval")))
    assert exact[-1] > -exact[0]  # PyHessian finds the largest magnitude: the premise of a fair comparison
    model.train()  # PyHessian would flip this to eval
    model[1].eval()  # ... but our BN layer is what decides the loss here: eval statistics, as PyHessian uses
    cross_entropy(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    theirs = hessian_eigenpairs(model, cross_entropy, batch, k=1, tol=1e-6, max_iter=1000, backend="pyhessian")
    assert model.training and not model[1].training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    ours = hessian_eigenpairs(model, cross_entropy, batch, k=1, tol=1e-6)
    assert ours.eigenvalues[0].item() == pytest.approx(theirs.eigenvalues[0].item(), rel=1e-3)
    assert ours.eigenvalues[0].item() == pytest.approx(exact[-1].item(), rel=1e-4)
    assert subspace_overlap(ours.eigenvectors, theirs.eigenvectors) > 0.99
    assert theirs.num_hvp > ours.num_hvp


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    """Validation loops run under no_grad (Lightning's validate under inference_mode)."""
    model, batch = mlp(), classification_batch("mlp")
    expected = hessian_eigenpairs(model, cross_entropy, batch, k=2)
    with context():
        result = hessian_eigenpairs(model, cross_entropy, batch, k=2)
    assert torch.equal(result.eigenvalues, expected.eigenvalues)
