"""NGN: closed-form steps on a quadratic, gamma <= sigma, NGN-M recursion, loss checks, DDP loss averaging."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hildtools.optimizers import NGN
from hildtools.optimizers.ngn import ngn, ngn_step_size


def quadratic(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.0, 0.05), (0.9, 0.0), (0.5, 0.05)])
def test_matches_the_closed_form_on_a_quadratic(momentum, weight_decay, foreach):
    hessian, x0 = quadratic()
    x = x0.clone().requires_grad_(True)
    opt = NGN([x], lr=0.7, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
    ref, buffer = x0.clone(), torch.zeros_like(x0)
    heavy_ball, previous = x0.clone(), x0.clone()  # the paper's form (no weight decay)
    for _ in range(15):
        opt.zero_grad()
        loss = 0.5 * x @ hessian @ x
        loss.backward()
        opt.step(loss=loss)
        f, g = 0.5 * ref @ hessian @ ref, hessian @ ref
        gamma = 0.7 / (1 + 0.7 * (g @ g) / (2 * f))
        buffer = momentum * buffer + (1 - momentum) * gamma * g
        ref = ref * (1 - gamma * weight_decay) - buffer
        torch.testing.assert_close(opt.param_groups[0]["gamma"], gamma, rtol=1e-13, atol=0)
        torch.testing.assert_close(x.detach(), ref, rtol=0, atol=1e-13)
        if weight_decay == 0:
            f, g = 0.5 * heavy_ball @ hessian @ heavy_ball, hessian @ heavy_ball
            gamma = 0.7 / (1 + 0.7 * (g @ g) / (2 * f))
            heavy_ball, previous = (
                heavy_ball - (1 - momentum) * gamma * g + momentum * (heavy_ball - previous),
                heavy_ball,
            )
            torch.testing.assert_close(x.detach(), heavy_ball, rtol=0, atol=1e-13)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_ngn_m_is_algorithm_1_of_the_paper(beta, foreach):
    """Algorithm 1 (NGN-M) of Islamov, Ajroldi, Orvieto & Lucchi, arXiv:2508.15071, written out line by line:

        input x_1 = x_0, c > 0, beta in [0, 1)
        for k = 0, 1, ...:   gamma_k = c / (1 + c / (2 f(x_k)) ||grad f(x_k)||^2)
                             x_{k+1} = x_k - (1 - beta) gamma_k grad f(x_k) + beta (x_k - x_{k-1})

    on f(x) = 1/2 (x - x*)^T A (x - x*) >= 0 (minimum 0 away from the origin), with x split over two
    tensors so that ||grad f|| is the norm over all of them."""
    hessian, x_star = quadratic(seed=3, n=7)
    c = 2.0
    start = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)
    head, tail = start[:3].clone().requires_grad_(True), start[3:].clone().requires_grad_(True)
    opt = NGN([head, tail], lr=c, momentum=beta, foreach=foreach)
    x, x_previous = start.clone(), start.clone()  # x_1 = x_0
    for _ in range(30):
        f = 0.5 * (x - x_star) @ hessian @ (x - x_star)
        grad = hessian @ (x - x_star)
        gamma = c / (1 + c / (2 * f) * (grad @ grad))
        x, x_previous = x - (1 - beta) * gamma * grad + beta * (x - x_previous), x

        opt.zero_grad()
        ours = torch.cat([head, tail])
        loss = 0.5 * (ours - x_star) @ hessian @ (ours - x_star)
        loss.backward()
        opt.step(loss=loss)
        torch.testing.assert_close(opt.param_groups[0]["gamma"], gamma, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.cat([head, tail]).detach(), x, rtol=0, atol=1e-12)
    final = 0.5 * (x - x_star) @ hessian @ (x - x_star)
    assert final < 0.1 * (0.5 * (start - x_star) @ hessian @ (start - x_star))  # and it does optimise


def test_gamma_never_exceeds_sigma_and_tends_to_the_polyak_step():
    g = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-6, 4, (2, 200), generator=g).double()
    losses, sq_norms = torch.rand(2, 200, generator=g, dtype=torch.float64) * scales
    for sigma in (1e-3, 0.1, 1.0, 30.0):
        for f, s in zip(losses, sq_norms, strict=True):
            gamma, ok = ngn_step_size(f, s, sigma)
            assert ok
            assert 0 < gamma <= sigma
    gamma, _ = ngn_step_size(torch.tensor(2.0, dtype=torch.float64), torch.tensor(8.0, dtype=torch.float64), 1e12)
    torch.testing.assert_close(gamma, torch.tensor(2 * 2.0 / 8.0, dtype=torch.float64))


def test_zero_loss_takes_no_step():
    gamma, ok = ngn_step_size(torch.tensor(0.0), torch.tensor(0.0), 1.0)
    assert ok
    assert gamma == 0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    NGN([p], lr=1.0).step(loss=0.0)
    assert torch.equal(p.detach(), torch.ones(3))


def test_closure_equals_loss_keyword():
    hessian, x0 = quadratic(1)
    xs = [x0.clone().requires_grad_(True) for _ in range(2)]
    opts = [NGN([x], lr=2.0, momentum=0.5) for x in xs]
    for _ in range(5):

        def closure():
            opts[0].zero_grad()
            loss = 0.5 * xs[0] @ hessian @ xs[0]
            loss.backward()
            return loss

        returned = opts[0].step(closure)
        opts[1].zero_grad()
        loss = 0.5 * xs[1] @ hessian @ xs[1]
        loss.backward()
        assert opts[1].step(loss=loss.item()) is None
        assert torch.equal(returned, loss)
    assert torch.equal(xs[0], xs[1])


def test_one_norm_over_all_groups_and_sigma_per_group():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = NGN([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 2.0}])
    loss = 0.5 * (a.square().sum() + b.square().sum())  # f = 7, ||g||^2 = 14
    loss.backward()
    opt.step(loss=loss)
    for group, sigma in zip(opt.param_groups, (0.5, 2.0), strict=True):
        assert group["gamma"].item() == pytest.approx(sigma / (1 + sigma * 14 / 14))
    torch.testing.assert_close(a.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64) * (1 - 0.5 / 1.5))
    torch.testing.assert_close(b.detach(), torch.tensor([3.0], dtype=torch.float64) * (1 - 2.0 / 3.0))


def test_gamma_is_a_tensor_on_the_parameter_device():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = NGN([p], lr=1.0)
    opt.step(loss=torch.tensor(1.5))
    gamma = opt.param_groups[0]["gamma"]
    assert isinstance(gamma, torch.Tensor)
    assert gamma.ndim == 0
    assert gamma.device == p.device


@pytest.mark.parametrize("foreach", [False, True])
def test_negative_loss_is_refused_and_nothing_moves(foreach):
    p = torch.nn.Parameter(torch.ones(3))
    opt = NGN([p], lr=1.0, momentum=0.9, foreach=foreach)
    p.grad = torch.ones(3)
    opt.step(loss=1.0)
    before, buffer = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match="non-negative loss"):
        opt.step(loss=torch.tensor(-0.5))
    assert torch.equal(p.detach(), before)
    assert torch.equal(opt.state[p]["momentum_buffer"], buffer)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step_with_a_warning(bad, foreach):
    p = torch.nn.Parameter(torch.ones(3))
    opt = NGN([p], lr=1.0, momentum=0.9, weight_decay=0.1, foreach=foreach)
    p.grad = torch.ones(3)
    opt.step(loss=1.0)
    before, buffer = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.tensor([bad, 1.0, -bad])  # gradients of a non-finite loss are usually non-finite too
    with pytest.warns(UserWarning, match="NaN/inf"):
        opt.step(loss=torch.tensor(bad))
    assert torch.equal(p.detach(), before)
    assert torch.equal(opt.state[p]["momentum_buffer"], buffer)
    p.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss=1.0)  # training goes on, no further warning
    assert not torch.equal(p.detach(), before)


@pytest.mark.gpu
def test_cuda_skips_without_blocking_and_reports_at_a_later_step():
    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    opt = NGN([p], lr=1.0, momentum=0.9)
    p.grad = torch.ones(3, device="cuda")
    opt.step(loss=torch.tensor(1.0, device="cuda"))
    before = p.detach().clone()
    p.grad = torch.tensor([float("nan"), 1.0, 1.0], device="cuda")
    opt.step(loss=torch.tensor(float("nan"), device="cuda"))
    assert torch.equal(p.detach(), before)
    torch.cuda.synchronize()
    p.grad = torch.ones(3, device="cuda")
    with pytest.warns(UserWarning, match="NaN/inf"):
        opt.step(loss=torch.tensor(1.0, device="cuda"))
    torch.cuda.synchronize()
    opt.step(loss=torch.tensor(-1.0, device="cuda"))
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="non-negative"):
        opt.step(loss=torch.tensor(1.0, device="cuda"))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.1), (0.9, 0.1)])
def test_device_masked_update_equals_the_host_decided_one_and_skips_exactly(momentum, weight_decay, foreach):
    """The masked path (what runs on accelerators) against the host-decided path (what runs on CPU)."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [torch.randn_like(t) for t in start]
    gamma = torch.tensor(0.3, dtype=torch.float64)
    results = []
    for ok in (None, torch.tensor(True)):
        params, buffers = [t.clone() for t in start], [torch.ones_like(t) for t in start]
        kwargs = {"momentum": momentum, "weight_decay": weight_decay, "maximize": False, "foreach": foreach}
        ngn(params, grads, buffers if momentum else [], gamma=gamma, ok=ok, **kwargs)
        results.append(params + buffers)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)

    params, buffers = [t.clone() for t in start], [torch.ones_like(t) for t in start]
    bad = [torch.full_like(t, float("nan")) for t in grads]
    bad[1][0] = float("inf")
    ngn(params, bad, buffers if momentum else [], gamma=torch.tensor(0.0, dtype=torch.float64),
        ok=torch.tensor(False), **kwargs)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params, start, strict=True))
    assert all(torch.equal(b, torch.ones_like(b)) for b in buffers)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        ({}, ValueError, "exactly one"),
        ({"closure": lambda: torch.tensor(1.0), "loss": 1.0}, ValueError, "exactly one"),
        ({"loss": torch.ones(2)}, ValueError, "scalar"),
        ({"loss": "1.0"}, TypeError, "loss"),
    ],
)
def test_bad_step_calls_are_refused(call, error, match):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(error, match=match):
        NGN([p]).step(**call)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -0.1}, ValueError, "lr"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"params": [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0}]}, ValueError, "lr"),
        ({"lr": float("inf")}, ValueError, "lr"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
        ({"maximize": "no"}, TypeError, "maximize"),
        ({"foreach": 0}, TypeError, "foreach"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    params = kwargs.pop("params", [torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(error, match=match):
        NGN(params, **kwargs)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_foreach_and_for_loop_round_alike_in_low_precision(dtype, momentum):
    """The two paths run the same operations, so they agree bitwise (they differed by 4.9e-4 in fp16
    with weight decay: a fused multiply-add on one side, a multiply then an add on the other)."""
    torch.manual_seed(0)
    start = [torch.rand(2, 3, dtype=dtype), torch.randn(50, dtype=dtype)]
    grads = [torch.rand_like(t) for t in start]
    results = []
    for foreach in (False, True):
        params = [t.clone().requires_grad_() for t in start]
        opt = NGN(params, lr=0.5, momentum=momentum, weight_decay=0.01, foreach=foreach)
        for _ in range(7):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step(loss=torch.tensor(0.7))
        results.append(params)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def _ddp_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        opt = NGN([p], lr=3.0, momentum=0.5)
        for step in range(3):
            p.grad = torch.full((4,), 0.5 + step, dtype=torch.float64)  # what DDP leaves: averaged gradients
            opt.step(loss=torch.tensor(1.0 + 2.0 * rank + step, dtype=torch.float64))  # local losses differ
        results[rank] = p.detach().clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_average_the_loss_and_stay_identical(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, os.fspath(tmp_path / "init"), results), nprocs=2)
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    reference = NGN([p], lr=3.0, momentum=0.5)
    for step in range(3):
        p.grad = torch.full((4,), 0.5 + step, dtype=torch.float64)
        reference.step(loss=(1.0 + step + 3.0 + step) / 2)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], p.detach(), rtol=1e-15, atol=0)
