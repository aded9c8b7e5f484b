"""SAM / ASAM against a from-formula two-pass reference and pytorch-optimizer; restore, BN, GradScaler, DDP."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_optimizer import SAM as PeerSAM

from hildtools.optimizers import SAM
from hildtools.optimizers.sam import frozen_norm_stats


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(dtype)


def batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 2, generator=g, dtype=dtype)


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    return closure


def reference_sam(model, steps, lrs, rhos, momentum, weight_decay, adaptive, eta):
    """Two passes written from the formulas, then heavy-ball SGD written out (torch's buffer convention)."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {}

    def grads_at(params, x, y):
        params = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        loss = (torch.func.functional_call(model, params, (x,)) - y).square().mean()
        return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))

    for step in range(steps):
        x, y = batch(step)
        g = grads_at(w, x, y)
        scale = {n: (w[n].abs() + eta) if adaptive else torch.ones_like(w[n]) for n in names}
        norm = torch.sqrt(sum(((scale[n] * g[n]) ** 2).sum() for n in names))
        perturbed = {n: w[n] + rhos[n] * scale[n] ** 2 * g[n] / (norm + 1e-12) for n in names}
        g_sam = grads_at(perturbed, x, y)
        for n in names:
            d = g_sam[n] + weight_decay * w[n]
            buffers[n] = d if n not in buffers else momentum * buffers[n] + d
            w[n] = w[n] - lrs[n] * buffers[n]
    return w


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_matches_the_two_pass_reference_for_20_steps(adaptive, eta, foreach):
    model = mlp()
    reference = reference_sam(
        model,
        20,
        lrs={"0.weight": 0.05, "0.bias": 0.05, "2.weight": 0.1, "2.bias": 0.1},
        rhos={"0.weight": 0.05, "0.bias": 0.05, "2.weight": 0.2, "2.bias": 0.2},
        momentum=0.9,
        weight_decay=5e-4,
        adaptive=adaptive,
        eta=eta,
    )
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1, "rho": 0.2}]
    opt = SAM(groups, torch.optim.SGD, rho=0.05, adaptive=adaptive, eta=eta, lr=0.05, momentum=0.9,
              weight_decay=5e-4, foreach=foreach)  # fmt: skip
    for step in range(20):
        x, y = batch(step)
        with torch.no_grad():
            clean_loss = (model(x) - y).square().mean()  # at w, before the step
        loss = opt.step(closure_for(model, opt, x, y))
        assert torch.equal(loss.detach(), clean_loss)  # step returns the first (unperturbed) closure's loss
        assert loss.grad_fn is not None  # and it is the closure's own graph-carrying loss, not a copy
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=0, atol=1e-13)


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_pytorch_optimizer_sam(adaptive):
    ours, peer = mlp(torch.float32), mlp(torch.float32)
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, lr=0.05, momentum=0.9)
    peer_opt = PeerSAM(peer.parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, lr=0.05, momentum=0.9)
    for step in range(20):
        x, y = batch(step, torch.float32)
        opt.step(closure_for(ours, opt, x, y))
        (peer(x) - y).square().mean().backward()
        peer_opt.first_step(zero_grad=True)
        (peer(x) - y).square().mean().backward()
        peer_opt.second_step(zero_grad=True)
    for p, q in zip(ours.parameters(), peer.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_rho_zero_is_the_base_optimizer():
    ours, base = mlp(), mlp()
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    base_opt = torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        x, y = batch(step)
        opt.step(closure_for(ours, opt, x, y))
        base_opt.step(closure_for(base, base_opt, x, y))
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), base.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_are_restored_exactly(dtype):
    model = mlp(dtype)
    start = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    opt.step(closure_for(model, opt, *batch(0, dtype)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))


def test_state_dict_holds_the_base_momentum_and_no_weight_copy():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.step(closure_for(model, opt, *batch(0)))
    state = opt.state_dict()
    assert [set(s) for s in state["state"].values()] == [{"momentum_buffer"}] * 4
    assert opt.base_optimizer.state is opt.state
    assert state["param_groups"][0]["rho"] == 0.05
    assert state["param_groups"][0]["momentum"] == 0.9
    fresh = SAM(mlp().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    fresh.load_state_dict(state)
    assert fresh.base_optimizer.state is fresh.state
    assert fresh.base_optimizer.param_groups is fresh.param_groups
    assert len(fresh.base_optimizer.state) == 4


def test_two_call_api_equals_closure_step():
    ours, manual = mlp(), mlp()
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    manual_opt = SAM(manual.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for step in range(5):
        x, y = batch(step)
        clean = opt.step(closure_for(ours, opt, x, y))
        loss = (manual(x) - y).square().mean()
        loss.backward()
        manual_opt.first_step(zero_grad=True)
        (manual(x) - y).square().mean().backward()
        manual_opt.second_step(zero_grad=True)
        assert torch.equal(clean, loss)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), manual.parameters(), strict=True))


class BNNet(torch.nn.Module):
    def __init__(self, bn_momentum):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.bn, self.out = (
            torch.nn.Linear(5, 6),
            torch.nn.BatchNorm1d(6, momentum=bn_momentum),
            torch.nn.Linear(6, 2),
        )

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("bn_momentum", [0.1, None])
def test_batchnorm_statistics_move_once_per_step(bn_momentum):
    model, clean = BNNet(bn_momentum), BNNet(bn_momentum)
    without_model = BNNet(bn_momentum)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    naive = SAM(without_model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = batch(0, torch.float32)
    opt.step(closure_for(model, opt, x, y))
    naive.step(closure_for(without_model, naive, x, y))
    clean(x)  # one forward at w, in training mode
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(clean.bn, name))
    assert without_model.bn.num_batches_tracked == 2  # what happens without `model`
    assert not torch.equal(without_model.bn.running_mean, clean.bn.running_mean)


def test_frozen_norm_stats_keeps_the_mode_and_restores_the_buffers():
    model = BNNet(0.1)
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    with frozen_norm_stats(model):
        model(batch(0, torch.float32)[0])
        assert model.training
        assert model.bn.num_batches_tracked == 1
    assert all(torch.equal(v, model.bn.state_dict()[k]) for k, v in before.items())


def test_gradscaler_recipe_matches_the_unscaled_step_and_skips_on_inf():
    ours, reference = mlp(torch.float32), mlp(torch.float32)
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        x, y = batch(step, torch.float32)
        scaler.scale((ours(x) - y).square().mean()).backward()
        opt.first_step(zero_grad=True)  # the perturbation does not depend on the loss scale
        scaler.scale((ours(x) - y).square().mean()).backward()
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        ref_opt.step(closure_for(reference, ref_opt, x, y))
    for p, q in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    start = [p.detach().clone() for p in ours.parameters()]
    x, y = batch(9, torch.float32)
    scaler.scale((ours(x) - y).square().mean()).backward()
    opt.first_step(zero_grad=True)
    scaler.scale((ours(x) - y).square().mean()).backward()
    next(ours.parameters()).grad[0, 0] = float("inf")  # overflow in the second pass
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), start, strict=True))
    assert scaler.get_scale() == 2.0**9


def test_scheduler_on_sam_sees_the_two_call_steps():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            x, y = batch(step)
            (model(x) - y).square().mean().backward()
            opt.first_step(zero_grad=True)
            (model(x) - y).square().mean().backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_misuse_raises_clear_errors():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="needs a first_step"):
        opt.second_step()
    (model(batch(0)[0]).sum()).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.optim.SGD,), {"rho": -0.1, "lr": 0.1}, ValueError, "rho"),
        ((torch.optim.SGD,), {"eta": -1.0, "lr": 0.1}, ValueError, "eta"),
        ((torch.optim.SGD,), {"adaptive": "yes", "lr": 0.1}, TypeError, "adaptive"),
        ((torch.optim.SGD,), {"model": "net", "lr": 0.1}, TypeError, "model"),
        ((torch.optim.SGD,), {"lr": -0.1}, ValueError, "learning rate"),  # the base optimizer's own check
        (("SGD",), {}, TypeError, "base_optimizer"),
        ((lambda params: object(),), {}, TypeError, "base_optimizer"),
    ],
)
def test_bad_arguments_are_refused(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        SAM(mlp().parameters(), *args, **kwargs)


def test_an_optimizer_instance_is_refused():
    model = mlp()
    with pytest.raises(TypeError, match="not an optimizer instance"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_per_group_bad_rho_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": model.parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1)


def _ddp_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
        for step in range(3):
            opt.step(closure_for(model, opt, *batch(10 * step + rank)))
        results[rank] = [p.detach().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_perturbs_per_rank_and_keeps_ranks_identical(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, os.fspath(tmp_path / "init"), results), nprocs=2)
    # Reference: each rank perturbs along its own gradient; the second-pass gradients are averaged.
    model = mlp()
    for step in range(3):
        sam_grads = []
        for rank in range(2):
            x, y = batch(10 * step + rank)
            replica = mlp()
            replica.load_state_dict(model.state_dict())
            grads = torch.autograd.grad((replica(x) - y).square().mean(), list(replica.parameters()))
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
            with torch.no_grad():
                for p, g in zip(replica.parameters(), grads, strict=True):
                    p.add_(0.5 * g / (norm + 1e-12))
            sam_grads.append(torch.autograd.grad((replica(x) - y).square().mean(), list(replica.parameters())))
        with torch.no_grad():
            for p, g0, g1 in zip(model.parameters(), *sam_grads, strict=True):
                p.sub_(0.1 * (g0 + g1) / 2)
    for p0, p1, ref in zip(results[0], results[1], model.parameters(), strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, ref.detach(), rtol=0, atol=1e-13)
