"""The curvature engine on CUDA: fp32 eigenpairs against the CPU fp64 dense Hessian, bf16 models with fp32
products, the basis offloaded to the CPU, torch.func, PyHessian with cuda=True, and no side effects on the CUDA
RNG. Skipped without a GPU (tests/conftest.py)."""

import copy

import pytest
import torch
from test_curvature_reference import MODELS, classification_batch, cross_entropy, dense_hessian

from hildtools.curvature import HessianOperator, hessian_eigenpairs, hessian_trace, subspace_overlap

pytestmark = pytest.mark.gpu


def on_cuda(name, dtype=torch.float32):
    model = MODELS[name]().to("cuda", dtype)
    x, y = classification_batch(name)
    return model, (x.to("cuda", dtype), y.cuda())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_fp32_eigenpairs_on_cuda_match_the_cpu_fp64_dense_hessian(name, backend):
    values, vectors = torch.linalg.eigh(dense_hessian(MODELS[name](), cross_entropy, classification_batch(name)))
    model, batch = on_cuda(name)
    result = hessian_eigenpairs(model, cross_entropy, batch, k=5, tol=1e-5, backend=backend)
    assert result.eigenvectors.device.type == "cuda" and result.eigenvectors.dtype == torch.float32
    assert torch.allclose(result.eigenvalues, values.flip(0)[:5], rtol=1e-4)
    assert subspace_overlap(result.eigenvectors.cpu(), vectors.flip(1)[:, :5]) >= 0.999


def test_bf16_model_uses_fp32_products_on_cuda():
    model, batch = on_cuda("bn_eval", torch.bfloat16)
    reference = copy.deepcopy(model).cpu().double()
    hessian = dense_hessian(reference, cross_entropy, (batch[0].cpu().double(), batch[1].cpu()))
    operator = HessianOperator(model, cross_entropy, batch)
    assert operator.dtype == torch.float32
    v = torch.randn(operator.size, dtype=torch.float64)
    product = operator.matvec(v.cuda()).cpu().double()
    assert (product - hessian @ v).norm() <= 1e-5 * (hessian @ v).norm()
    values = torch.linalg.eigvalsh(hessian).flip(0)[:3]
    assert torch.allclose(hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-5).eigenvalues, values, rtol=1e-4)


def test_basis_offloaded_to_cpu_matches_the_basis_on_cuda():
    model, batch = on_cuda("cnn")
    on_device = hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-5)
    offloaded = hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-5, basis_device="cpu")
    assert offloaded.eigenvectors.device.type == "cuda"
    assert torch.allclose(on_device.eigenvalues, offloaded.eigenvalues, rtol=1e-5)
    assert subspace_overlap(on_device.eigenvectors, offloaded.eigenvectors) >= 0.9999


def test_no_side_effects_on_cuda():
    model, batch = on_cuda("bn_train")
    cross_entropy(model, batch).backward()
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    hessian_eigenpairs(model, cross_entropy, batch, k=2, smallest=True)
    hessian_trace(model, cross_entropy, batch, num_samples=9)
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training


def test_pyhessian_parity_on_cuda():
    pytest.importorskip("pyhessian")
    model, batch = on_cuda("bn_eval")
    cuda_rng = torch.cuda.get_rng_state()
    theirs = hessian_eigenpairs(model, cross_entropy, batch, k=1, tol=1e-6, max_iter=1000, backend="pyhessian")
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    ours = hessian_eigenpairs(model, cross_entropy, batch, k=1, tol=1e-6)
    assert ours.eigenvalues[0].item() == pytest.approx(theirs.eigenvalues[0].item(), rel=1e-3)
