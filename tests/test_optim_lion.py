"""Lion against lion-pytorch and the paper's update; compiled path; bad input."""

import copy

import pytest
import torch
from lion_pytorch import Lion as PeerLion

from hildtools.optimizers import Lion, Signum


def mlp(dtype, device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device, dtype)


def run(model, opt, steps, dtype, device="cpu", scheduler=None):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
        opt.zero_grad()
        (model(x.to(device, dtype)) - y.to(device, dtype)).square().mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 0.0), (torch.float32, 1e-6)])  # 0.0: bitwise
def test_matches_lion_pytorch_over_100_steps(dtype, atol, foreach):
    ours, peer = mlp(dtype), mlp(dtype)
    opt = Lion(ours.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    peer_opt = PeerLion(peer.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    run(ours, opt, 100, dtype)
    run(peer, peer_opt, 100, dtype)
    for p, q in zip(ours.parameters(), peer.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
        # the momentum is an interpolation here (lerp) and mul + add there: equal up to rounding
        torch.testing.assert_close(opt.state[p]["exp_avg"], peer_opt.state[q]["exp_avg"], rtol=1e-5, atol=10 * atol)


def test_matches_the_paper_update_written_out():
    torch.manual_seed(0)
    p = torch.randn(50, dtype=torch.float64, requires_grad=True)
    ref, m = p.detach().clone(), torch.zeros(50, dtype=torch.float64)
    opt = Lion([p], lr=0.01, betas=(0.8, 0.95), weight_decay=0.5)
    for _ in range(10):
        grad = torch.randn(50, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        c = 0.8 * m + 0.2 * grad
        ref = ref - 0.01 * (torch.sign(c) + 0.5 * ref)
        m = 0.95 * m + 0.05 * grad
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-14)


def test_zero_gradient_applies_only_the_decay():
    p = torch.nn.Parameter(torch.full((3,), 2.0))
    p.grad = torch.zeros(3)
    Lion([p], lr=0.1, weight_decay=0.5).step()
    assert torch.equal(p.detach(), torch.full((3,), 2.0 * (1 - 0.1 * 0.5)))


@pytest.mark.slow
def test_compiled_path_matches_foreach_and_does_not_recompile_under_a_schedule():
    from torch._dynamo.utils import counters

    dtype = torch.float32
    ours, ref = mlp(dtype), mlp(dtype)
    opt = Lion(ours.parameters(), lr=1e-2, weight_decay=0.1, compiled=True)
    ref_opt = Lion(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    graphs = counters["stats"]["unique_graphs"]
    run(ours, opt, 12, dtype, scheduler=sched)
    run(ref, ref_opt, 12, dtype, scheduler=ref_sched)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # compiled once; lr changes reuse it
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_agree(dtype):
    models = [mlp(dtype, "cuda") for _ in range(3)]
    opts = [
        Lion(models[0].parameters(), lr=1e-3, weight_decay=0.1, foreach=False),
        Lion(models[1].parameters(), lr=1e-3, weight_decay=0.1),  # foreach by default on CUDA
        Lion(models[2].parameters(), lr=1e-3, weight_decay=0.1, compiled=True),
    ]
    for model, opt in zip(models, opts, strict=True):
        run(model, opt, 20, dtype, "cuda")
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for p0, p1, p2 in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(p1, p0, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
        torch.testing.assert_close(p2, p0, **tol)


@pytest.mark.gpu
def test_cuda_matches_lion_pytorch():
    ours, peer = mlp(torch.float32, "cuda"), mlp(torch.float32, "cuda")
    run(ours, Lion(ours.parameters(), lr=1e-3, weight_decay=0.1), 100, torch.float32, "cuda")
    run(peer, PeerLion(peer.parameters(), lr=1e-3, weight_decay=0.1), 100, torch.float32, "cuda")
    for p, q in zip(ours.parameters(), peer.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"betas": (1.0, 0.99)}, ValueError, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]"),
        ({"betas": 0.9}, TypeError, "betas"),
        ({"betas": (0.9, 0.99, 0.999)}, TypeError, "betas"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"maximize": 1}, TypeError, "maximize"),
        ({"foreach": "yes"}, TypeError, "foreach"),
        ({"compiled": 1}, TypeError, "compiled"),
        ({"compiled": None}, TypeError, "compiled"),
        ({"fused": True}, TypeError, "fused"),  # the old name of compiled=
        ({"foreach": True, "compiled": True}, ValueError, "foreach and compiled"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Lion(mlp(torch.float32).parameters(), **kwargs)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", ["lion", "signum", "signsgd"])
def test_a_tensor_lr_is_never_read_on_the_host(name, foreach):
    """Parameters, gradients and lr on the meta device: any host read (float(lr), .item()) raises."""
    p = torch.nn.Parameter(torch.empty(5, device="meta"))
    p.grad = torch.empty(5, device="meta")
    opt = {
        "lion": lambda: Lion([p], lr=0.1, weight_decay=0.1, foreach=foreach),
        "signum": lambda: Signum([p], lr=0.1, weight_decay=0.1, nesterov=True, foreach=foreach),
        "signsgd": lambda: Signum([p], lr=0.1, momentum=0.0, foreach=foreach),
    }[name]()
    opt.param_groups[0]["lr"] = torch.tensor(0.05, device="meta")  # as a scheduler writing tensors would
    opt.step()


@pytest.mark.gpu
def test_cuda_tensor_lr_step_does_not_synchronize():
    model = mlp(torch.float32, "cuda")
    opt = Lion(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.1)
    model(torch.randn(8, 16, device="cuda")).square().mean().backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_an_old_state_dict_with_fused_loads_as_compiled():
    model = mlp(torch.float32)
    opt = Lion(model.parameters(), lr=1e-3)
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["fused"] = group.pop("compiled")
        del group["maximize"], group["foreach"]
    opt.load_state_dict(state)
    assert [(g["compiled"], g["maximize"], g["foreach"]) for g in opt.param_groups] == [(False, False, None)]
    assert all("fused" not in g for g in opt.param_groups)


def test_sparse_gradients_are_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Lion([p]).step()


def test_deepcopy_keeps_the_state():
    model = mlp(torch.float64)
    opt = Lion(model.parameters(), lr=1e-3)
    run(model, opt, 2, torch.float64)
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
