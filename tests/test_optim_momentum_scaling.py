"""Momentum scaling 1 - beta = C lr^(2/3): follows StepLR and cosine exactly, equals heavy-ball SGD, bad input."""

import pytest
import torch

from hildtools.optimizers import SAM, Lion, MomentumScaling, ScaledMomentumSGD
from hildtools.optimizers.momentum_scaling import momentum_constant


def params(seed=0):
    torch.manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(6, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(3, dtype=torch.float64)),
    ]


def quadratic_grads(ps, step):
    g = torch.Generator().manual_seed(step)
    for p in ps:
        p.grad = p.detach() * 0.5 + torch.randn(p.shape, generator=g, dtype=torch.float64)


SCHEDULES = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=1e-3),
}


def record_used_betas(opt, key):
    """(lr, beta) as the optimizer sees them at each step, after MomentumScaling's pre-hook."""
    seen = []

    def hook(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        seen.append((group["lr"], group["momentum"] if key == "momentum" else group["betas"]))

    opt.register_step_post_hook(hook)
    return seen


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_beta_follows_the_schedule_exactly(schedule):
    ps = params()
    opt = torch.optim.SGD(ps, lr=0.2, momentum=0.0)
    MomentumScaling(opt, C=0.9)
    sched = SCHEDULES[schedule](opt)
    seen = record_used_betas(opt, "momentum")
    for step in range(12):
        quadratic_grads(ps, step)
        opt.step()
        sched.step()
    assert len({lr for lr, _ in seen}) > 3
    for lr, beta in seen:
        assert beta == 1 - 0.9 * lr ** (2 / 3)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scaled_momentum_sgd_equals_heavy_ball_sgd_with_the_rule(schedule):
    ours, ref = params(), params()
    opt = ScaledMomentumSGD(ours, lr=0.2, lr0=0.1, beta0=0.9, weight_decay=1e-3)
    sched = SCHEDULES[schedule](opt)
    ref_opt = torch.optim.SGD(ref, lr=0.2, momentum=0.5, weight_decay=1e-3)
    ref_sched = SCHEDULES[schedule](ref_opt)
    c = (1 - 0.9) / 0.1 ** (2 / 3)
    for step in range(12):
        quadratic_grads(ours, step)
        quadratic_grads(ref, step)
        ref_opt.param_groups[0]["momentum"] = 1 - c * ref_opt.param_groups[0]["lr"] ** (2 / 3)
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, ref, strict=True))


def test_reference_pair_gives_beta0_at_lr0():
    assert momentum_constant(lr0=0.1, beta0=0.9) == pytest.approx(0.1 / 0.1 ** (2 / 3))
    opt = ScaledMomentumSGD(params(), lr=0.1, lr0=0.1, beta0=0.9)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.9)


def test_sets_the_chosen_entry_of_betas():
    adam = torch.optim.Adam(params(), lr=1e-3, betas=(0.9, 0.999))
    MomentumScaling(adam, C=2.0)
    assert adam.param_groups[0]["betas"] == (1 - 2.0 * 1e-3 ** (2 / 3), 0.999)
    lion = Lion(params(), lr=1e-4, betas=(0.9, 0.99))
    MomentumScaling(lion, C=1.0, beta_index=1)
    assert lion.param_groups[0]["betas"] == (0.9, 1 - 1e-4 ** (2 / 3))


def test_works_on_sam_through_its_base_optimizer():
    ps = params()
    sam = SAM(ps, torch.optim.SGD, lr=0.2, momentum=0.0)
    MomentumScaling(sam.base_optimizer, C=0.5)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    for step in range(3):
        quadratic_grads(ps, step)
        sam.first_step(zero_grad=True)
        quadratic_grads(ps, step)
        sam.second_step()
        sched.step()
    quadratic_grads(ps, 9)
    sam.first_step(zero_grad=True)
    quadratic_grads(ps, 9)
    sam.second_step()
    assert sam.param_groups[0]["momentum"] == 1 - 0.5 * 0.025 ** (2 / 3)


def test_zero_lr_keeps_the_previous_beta():
    ps = params()
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.0)
    MomentumScaling(opt, C=1.0)
    beta = opt.param_groups[0]["momentum"]
    opt.param_groups[0]["lr"] = 0.0
    quadratic_grads(ps, 0)
    opt.step()
    assert opt.param_groups[0]["momentum"] == beta


def test_growing_lr_that_breaks_the_range_raises():
    ps = params()
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.0)
    MomentumScaling(opt, C=3.0)  # fine at 0.1 (beta = 0.35), not at 0.2 (beta < 0)
    opt.param_groups[0]["lr"] = 0.2
    quadratic_grads(ps, 0)
    with pytest.raises(ValueError, match="C=3 puts beta"):
        opt.step()


def test_state_round_trip():
    opt = ScaledMomentumSGD(params(), lr=0.05, C=0.7)
    state = opt.state_dict()
    assert state["param_groups"][0]["C"] == 0.7
    fresh = ScaledMomentumSGD(params(), lr=0.05, C=0.1)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["C"] == 0.7
    scaling = MomentumScaling(torch.optim.SGD(params(), lr=0.1, momentum=0.5), C=0.4)
    other = MomentumScaling(torch.optim.SGD(params(), lr=0.1, momentum=0.5), C=0.9)
    other.load_state_dict(scaling.state_dict())
    assert other.C == 0.4


def test_remove_detaches_the_hook():
    ps = params()
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.0)
    scaling = MomentumScaling(opt, C=1.0)
    scaling.remove()
    opt.param_groups[0]["lr"] = 0.01
    quadratic_grads(ps, 0)
    opt.step()
    assert opt.param_groups[0]["momentum"] == 1 - 0.1 ** (2 / 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"C": 5.0}, ValueError, "C=5 puts beta"),  # 1 - 5 * 0.1^(2/3) < 0
        ({"C": 0.0}, ValueError, "C must be > 0"),
        ({"C": -1.0}, ValueError, "C"),
        ({"C": "1"}, TypeError, "C"),
        ({}, ValueError, "give C"),
        ({"lr0": 0.1}, ValueError, "give C"),
        ({"C": 1.0, "lr0": 0.1, "beta0": 0.9}, ValueError, "not both"),
        ({"lr0": 0.0, "beta0": 0.9}, ValueError, "lr0"),
        ({"lr0": 0.1, "beta0": 1.0}, ValueError, "beta0"),
        ({"lr0": 0.1, "beta0": -0.2}, ValueError, "beta0"),
        ({"C": 1.0, "exponent": 0.0}, ValueError, "exponent"),
        ({"C": 1.0, "beta_index": 2}, ValueError, "beta_index"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        MomentumScaling(torch.optim.SGD(params(), lr=0.1, momentum=0.9), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 0.0, "C": 1.0}, ValueError, "lr must be > 0"),
        ({"lr": -0.1, "C": 1.0}, ValueError, "lr"),
        ({"lr": 0.1, "C": 5.0}, ValueError, "C=5 puts beta"),
        ({"lr": 0.1}, ValueError, "give C"),
    ],
)
def test_scaled_sgd_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        ScaledMomentumSGD(params(), **kwargs)


def test_optimizer_without_momentum_is_refused():
    with pytest.raises(ValueError, match="no 'momentum' or 'betas'"):
        MomentumScaling(torch.optim.Adagrad(params()), C=1.0)
    with pytest.raises(TypeError, match="optimizer"):
        MomentumScaling("sgd", C=1.0)
