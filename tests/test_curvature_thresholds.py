"""stability_threshold and adam_preconditioner: real torch optimizers on 1-D quadratics converge at 0.98x their
threshold and diverge at 1.02x; Adam's update equals -lr P^{-1} m_t with our P; bad input."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from hildtools.curvature import adam_preconditioner, stability_threshold
from hildtools.curvature.thresholds import UnknownThresholdError

SGD_CASES = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "momentum 0.5": {"momentum": 0.5},
    "dampening": {"momentum": 0.9, "dampening": 0.5},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "nesterov 0.99": {"momentum": 0.99, "nesterov": True},
}


def run_quadratic(make_optimizer, curvature, steps=400, start=1.0):
    """``(final, peak)`` of |x| / |x_0| over ``steps`` steps of the optimizer on L = curvature * x^2 / 2.

    The optimizer first takes 200 steps at x = 0 (zero gradient, so nothing moves): bias corrections and
    first-step special cases are over before the quadratic starts, leaving the stationary linear dynamics."""
    x = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = make_optimizer([x])
    for _ in range(200):
        x.grad = torch.zeros_like(x)
        optimizer.step()
    with torch.no_grad():
        x.fill_(start)
    peak = 1.0
    for _ in range(steps):
        x.grad = curvature * x.detach().clone()  # dL/dx
        optimizer.step()
        peak = max(peak, abs(x.item()) / start)
    return abs(x.item()) / start, peak


def converges(make_optimizer, curvature, start=1.0):
    final, peak = run_quadratic(make_optimizer, curvature, start=start)
    return final < 1e-3 and peak < 100


def diverges(make_optimizer, curvature, start=1.0):
    return run_quadratic(make_optimizer, curvature, start=start)[1] > 1e3


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_converges_below_and_diverges_above_its_threshold(case):
    lr = 0.1

    def make(params):
        return torch.optim.SGD(params, lr=lr, **SGD_CASES[case])

    threshold = stability_threshold(make([nn.Parameter(torch.zeros(1))]))
    assert converges(make, 0.98 * threshold)
    assert diverges(make, 1.02 * threshold)


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("beta1", [0.9, 0.5])
def test_adam_with_a_frozen_preconditioner_converges_below_and_diverges_above_its_threshold(kind, beta1):
    """A large eps freezes Adam's preconditioner (P -> eps once 1 - b1^t -> 1) while |g| << eps, so the
    preconditioned curvature is curvature / eps; a tiny start keeps |g| << eps while |x| grows 1000-fold (beyond,
    Adam's preconditioner adapts and tames the divergence, so only the linear regime is a test)."""
    lr, eps = 0.01, 1.0

    def make(params):
        return getattr(torch.optim, kind)(params, lr=lr, betas=(beta1, 0.999), eps=eps, weight_decay=0.0)

    threshold = stability_threshold(make([nn.Parameter(torch.zeros(1))]))
    assert threshold == pytest.approx((2 + 2 * beta1) / ((1 - beta1) * lr))
    assert converges(make, 0.98 * threshold * eps, start=1e-9)
    assert diverges(make, 1.02 * threshold * eps, start=1e-9)


@pytest.mark.parametrize("settings", [{}, {"amsgrad": True}, {"betas": (0.5, 0.9), "eps": 1e-3}])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_adam_update_is_minus_lr_p_inverse_times_the_first_moment(kind, settings):
    """The derivation in adam_preconditioner: theta_{t+1} - theta_t = -lr * s^2 * m_t with s = P^{-1/2}."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    optimizer = getattr(torch.optim, kind)(model.parameters(), lr=0.01, weight_decay=0.0, **settings)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    for _ in range(4):
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        s = adam_preconditioner(optimizer, list(model.parameters()))
        first_moment = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
        assert torch.allclose(after - before, -0.01 * s**2 * first_moment, rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize(
    "settings, factor",
    [
        ({}, 2.0),
        ({"momentum": 0.9}, 3.8),
        ({"momentum": 0.9, "dampening": 0.5}, 7.6),
        ({"momentum": 0.9, "nesterov": True}, 3.8 / 2.8),
    ],
)
def test_sgd_threshold_table(settings, factor):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5, **settings)
    assert stability_threshold(optimizer) == pytest.approx(factor / 0.5)


def test_adam_threshold_is_38_over_lr_at_the_default_beta1():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=torch.tensor(1e-3))
    assert stability_threshold(optimizer) == pytest.approx(38 / 1e-3)


def test_param_groups_must_agree_or_be_chosen():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.2}, {"params": []}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="param_group"):
        stability_threshold(optimizer)
    assert stability_threshold(optimizer, param_group=1) == pytest.approx(3.8 / 0.2)
    with pytest.raises(ValueError, match="param_group"):
        stability_threshold(optimizer, param_group=3)
    same = torch.optim.SGD([{"params": [a]}, {"params": [b], "weight_decay": 1e-4}], lr=0.1)
    assert stability_threshold(same) == pytest.approx(20.0)


def test_unknown_optimizer_names_the_supported_ones_and_the_alternative():
    optimizer = torch.optim.RMSprop([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="RMSprop.*SGD.*Adam.*hessian_eigenpairs"):
        stability_threshold(optimizer)


def test_adam_preconditioner_bad_input():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="Adam"):
        adam_preconditioner(torch.optim.SGD([p], lr=0.1), [p])
    optimizer = torch.optim.Adam([p], lr=0.1)
    with pytest.raises(ValueError, match="step"):
        adam_preconditioner(optimizer, [p])
    with pytest.raises(ValueError, match="params"):
        adam_preconditioner(optimizer, [nn.Parameter(torch.ones(2))])


def test_adam_preconditioner_defaults_to_the_optimizer_parameters():
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([p, q], lr=0.1)
    (p.sum() + (q**2).sum()).backward()
    optimizer.step()
    assert torch.equal(adam_preconditioner(optimizer), adam_preconditioner(optimizer, [p, q]))
    assert adam_preconditioner(optimizer).shape == (5,)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_ngn_threshold_is_the_heavy_ball_threshold_at_its_step_gamma(momentum):
    from hildtools.optimizers import NGN

    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = NGN([w], lr=0.5, momentum=momentum)
    heavy_ball = (2 + 2 * momentum) / (1 - momentum)
    assert stability_threshold(optimizer) == pytest.approx(heavy_ball / 0.5)  # before a step: gamma <= lr
    loss = (w**2).sum()
    loss.backward()
    optimizer.step(loss=loss)
    gamma = float(optimizer.param_groups[0]["gamma"])
    assert 0 < gamma < 0.5
    assert stability_threshold(optimizer) == pytest.approx(heavy_ball / gamma)


def test_sam_gets_its_base_optimizer_threshold():
    from hildtools.optimizers import SAM

    sam = SAM([nn.Parameter(torch.zeros(1))], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    assert stability_threshold(sam) == pytest.approx(3.8 / 0.1)


def test_ngn_param_group_mismatch_raises_instead_of_unknown_optimizer():
    from hildtools.optimizers import NGN

    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = NGN([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1)
    with pytest.raises(ValueError, match="differ in lr") as error:
        stability_threshold(optimizer)
    assert not isinstance(error.value, UnknownThresholdError)
    assert stability_threshold(optimizer, param_group=1) == pytest.approx(2 / 0.2)


def test_unknown_optimizer_error_is_a_value_error_of_its_own_type():
    with pytest.raises(UnknownThresholdError):
        stability_threshold(torch.optim.Rprop([nn.Parameter(torch.zeros(1))]))
    assert issubclass(UnknownThresholdError, ValueError)


def test_thresholds_import_no_optimizer_package():
    code = (
        "import sys, hildtools.curvature.thresholds, hildtools.callbacks.edge_of_stability; "
        "print(sorted(m for m in sys.modules if m.startswith('hildtools.optimizers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
