"""Brute-force references for the curvature tests (dense Hessians, small models), and checks of the references
themselves against closed forms. Other ``test_curvature_*`` files import the helpers from here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call


def cross_entropy(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def mse(model, batch):
    return 0.5 * ((model(batch[0]) - batch[1]) ** 2).sum(1).mean()


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    return model.double().to(dtype)


def cnn(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
        .double()
        .to(dtype)
    )


def bn_mlp(dtype=torch.float64, seed=0, train=True):
    """An MLP with BatchNorm whose running statistics are not the initial ones (so eval mode differs)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        model(torch.randn(64, 6, dtype=torch.float64) * 2 + 1)  # move the running statistics away from (0, 1)
    return model.to(dtype).train(train)


def classification_batch(model_name, n=48, dtype=torch.float64, seed=1):
    """Inputs drawn in fp64 whatever ``dtype`` (so an fp32 batch is the rounded fp64 one), and 3-class labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 8, 8) if model_name == "cnn" else (n, 6)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 3, (n,), generator=g)


def bn_eval_mlp(dtype=torch.float64, seed=0):
    return bn_mlp(dtype, seed, train=False)


MODELS = {"mlp": mlp, "cnn": cnn, "bn_train": bn_mlp, "bn_eval": bn_eval_mlp}
"""Model builders ``(dtype=torch.float64) -> nn.Module``: the same weights in every dtype (built in fp64, cast)."""


def dense_hessian(model, loss_fn, batch, params=None):
    """The Hessian of ``loss_fn(model, batch)`` over the flattened parameters by ``torch.autograd.functional``:
    one ``functional_call`` of the model on a flat parameter vector (buffers copied, so BatchNorm statistics stay
    put), in the parameters' dtype."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(theta):
        tensors, start = {}, 0
        for p, shape in zip(params, shapes):
            tensors[names[id(p)]] = theta[start : start + math.prod(shape)].view(shape)
            start += math.prod(shape)
        tensors.update({n: b.clone() for n, b in buffers.items()})
        return loss_fn(lambda x: functional_call(model, tensors, (x,)), batch)

    hessian = torch.autograd.functional.hessian(loss, flat)
    return (hessian + hessian.T) / 2


def dense_operator(eigenvalues, seed=0, dtype=torch.float64):
    """A random symmetric matrix with the given eigenvalues, and its eigenvectors (columns, same order)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    return ((q * values) @ q.T).to(dtype), q.to(dtype)


def test_dense_hessian_of_linear_regression_is_the_gram_matrix():
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    assert torch.allclose(dense_hessian(model, mse, (x, y)), x.T @ x / 40, atol=1e-12)


def test_dense_hessian_of_logistic_regression_matches_the_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 2, (30, 1)).double()

    def loss_fn(m, b):
        return nn.functional.binary_cross_entropy_with_logits(m(b[0]), b[1])

    p = torch.sigmoid(x @ model.weight.detach().T)
    assert torch.allclose(dense_hessian(model, loss_fn, (x, y)), x.T @ (p * (1 - p) * x) / 30, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_models_have_curvature_in_both_signs(name):
    model = MODELS[name]()
    values = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, classification_batch(name)))
    assert values[-1] > 0 and values[0] < 0
