"""Signum: equal to Lion(b, b), signSGD at momentum 0, Nesterov form, pytorch-optimizer's SignSGD; bad input."""

import pytest
import torch
from pytorch_optimizer import SignSGD

from hildtools.optimizers import Lion, Signum


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2)).to(dtype)


def run(model, opt, steps=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=g, dtype=dtype), torch.randn(32, 2, generator=g, dtype=dtype)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def assert_same_params(a, b, atol=0.0):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_lion_with_equal_betas(dtype, foreach):
    ours, lion = mlp(dtype), mlp(dtype)
    opt = Signum(ours.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1, foreach=foreach)
    run(ours, opt, dtype=dtype)
    lion_opt = Lion(lion.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.1, foreach=foreach)
    run(lion, lion_opt, dtype=dtype)
    assert_same_params(ours, lion)
    for p, q in zip(ours.parameters(), lion.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], lion_opt.state[q]["exp_avg"])


def test_momentum_zero_is_sign_sgd_without_state():
    torch.manual_seed(0)
    p = torch.randn(40, dtype=torch.float64, requires_grad=True)
    ref = p.detach().clone()
    opt = Signum([p], lr=0.05, momentum=0.0, weight_decay=0.2)
    for _ in range(5):
        grad = torch.randn(40, dtype=torch.float64)
        p.grad = grad
        opt.step()
        ref = ref * (1 - 0.05 * 0.2) - 0.05 * torch.sign(grad)
    assert torch.equal(p.detach(), ref)
    assert not opt.state[p]


@pytest.mark.parametrize("foreach", [False, True])
def test_nesterov_matches_its_formula_and_lion_with_squared_beta1(foreach):
    torch.manual_seed(0)
    p = torch.randn(200, dtype=torch.float64, requires_grad=True)
    ref, m = p.detach().clone(), torch.zeros(200, dtype=torch.float64)
    opt = Signum([p], lr=0.01, momentum=0.8, nesterov=True, foreach=foreach)
    lion_p = p.detach().clone().requires_grad_(True)
    lion = Lion([lion_p], lr=0.01, betas=(0.8**2, 0.8))
    for _ in range(30):
        grad = torch.randn(200, dtype=torch.float64)
        p.grad, lion_p.grad = grad.clone(), grad.clone()
        opt.step()
        lion.step()
        m = 0.8 * m + 0.2 * grad
        ref = ref - 0.01 * torch.sign(0.8 * m + 0.2 * grad)
    torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(p.detach(), lion_p.detach(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_pytorch_optimizer_sign_sgd(momentum):
    ours, peer = mlp(), mlp()
    run(ours, Signum(ours.parameters(), lr=1e-3, momentum=momentum, weight_decay=0.1))
    run(peer, SignSGD(peer.parameters(), lr=1e-3, momentum=momentum, weight_decay=0.1, weight_decouple=True))
    assert_same_params(ours, peer)


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.0, 0.9])  # 0: signSGD, the stateless form of the core
def test_compiled_path_matches_foreach(momentum):
    ours, ref = mlp(torch.float32), mlp(torch.float32)
    kwargs = {"lr": 1e-2, "momentum": momentum, "weight_decay": 0.1}
    run(ours, Signum(ours.parameters(), **kwargs, compiled=True), 10, torch.float32)
    run(ref, Signum(ref.parameters(), **kwargs, foreach=True), 10, torch.float32)
    assert_same_params(ours, ref, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("nesterov", [False, True])
def test_cuda_compiled_matches_foreach(nesterov):
    models = [mlp(torch.float32).cuda() for _ in range(2)]
    for model, extra in zip(models, [{"compiled": True}, {"foreach": True}], strict=True):
        opt = Signum(model.parameters(), lr=1e-2, momentum=0.9, nesterov=nesterov, **extra)
        g = torch.Generator().manual_seed(3)
        for _ in range(10):
            x, y = torch.randn(32, 6, generator=g).cuda(), torch.randn(32, 2, generator=g).cuda()
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
    assert_same_params(*models, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": None}, TypeError, "lr"),
        ({"lr": 1e-3, "momentum": 1.0}, ValueError, "momentum"),
        ({"lr": 1e-3, "momentum": -0.5}, ValueError, "momentum"),
        ({"lr": 1e-3, "weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"lr": 1e-3, "momentum": 0.0, "nesterov": True}, ValueError, "nesterov"),
        ({"lr": 1e-3, "nesterov": "no"}, TypeError, "nesterov"),
        ({"lr": 1e-3, "maximize": None}, TypeError, "maximize"),
        ({"lr": 1e-3, "foreach": True, "compiled": True}, ValueError, "foreach and compiled"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Signum(mlp().parameters(), **kwargs)


def test_lr_is_required_in_the_constructor_or_every_group():
    with pytest.raises(ValueError, match="lr"):
        Signum(mlp().parameters())
    model = mlp()
    opt = Signum([{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[2].parameters(), "lr": 2e-3}])
    assert [group["lr"] for group in opt.param_groups] == [1e-3, 2e-3]
    with pytest.raises(ValueError, match="lr"):
        Signum([{"params": model[0].parameters(), "lr": -1.0}])
