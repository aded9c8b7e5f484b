"""torch.optim conventions, checked for every hildtools optimizer.

State round trip, param groups, maximize, params without grad, foreach == single-tensor, gradients
left untouched, low-precision parameters, and CPU/CUDA.
"""

import copy
import io

import pytest
import torch

from hildtools.optimizers import NGN, SAM, Lion, ScaledMomentumSGD, Signum

OPTIMIZERS = {
    "lion": lambda params, **kw: Lion(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, **kw),
    "signum": lambda params, **kw: Signum(params, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw),
    "signum_nesterov": lambda params, **kw: Signum(params, lr=1e-2, momentum=0.8, nesterov=True, **kw),
    "signsgd": lambda params, **kw: Signum(params, lr=1e-2, momentum=0.0, weight_decay=0.1, **kw),
    "ngn": lambda params, **kw: NGN(params, lr=0.5, weight_decay=0.01, **kw),
    "ngn_m": lambda params, **kw: NGN(params, lr=0.5, momentum=0.9, weight_decay=0.01, **kw),
    "sam": lambda params, **kw: SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "asam": lambda params, **kw: SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, lr=0.05, **kw),
    "sam_adamw": lambda params, **kw: SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-2, **kw),
    "scaled_sgd": lambda params, **kw: ScaledMomentumSGD(params, lr=0.05, C=0.5, weight_decay=1e-3, **kw),
}
ELEMENTWISE = ["lion", "signum", "signum_nesterov", "signsgd", "scaled_sgd"]  # no coupling across groups
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.unused = torch.nn.Parameter(torch.ones(4))  # never receives a gradient

    def forward(self, x):
        return self.net(x)


def make_model(dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    return Model().to(device, dtype)


def make_data(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g).to(device, dtype), torch.randn(32, 3, generator=g).to(device, dtype)


def train(model, opt, data, steps, sign=1.0):
    x, y = data

    def closure():
        opt.zero_grad()
        loss = sign * (model(x) - y).square().mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name):
    data = make_data()
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, data, 6)

    model2 = make_model()
    opt2 = OPTIMIZERS[name](model2.parameters())
    train(model2, opt2, data, 3)
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # what Lightning does

    model3 = make_model()
    opt3 = OPTIMIZERS[name](model3.parameters())
    model3.load_state_dict(checkpoint["model"])
    opt3.load_state_dict(checkpoint["opt"])
    train(model3, opt3, data, 3)
    assert torch.equal(flat(model3), flat(model))


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_param_groups_with_different_lrs_equal_separate_optimizers(name):
    data = make_data()
    model = make_model()
    first, second = model.net[0].parameters(), model.net[2].parameters()
    opt = OPTIMIZERS[name]([{"params": first}, {"params": second, "lr": 3e-3}])
    train(model, opt, data, 5)

    model2 = make_model()
    opt_a = OPTIMIZERS[name](model2.net[0].parameters())
    opt_b = OPTIMIZERS[name]([{"params": model2.net[2].parameters(), "lr": 3e-3}])
    x, y = data
    for _ in range(5):
        opt_a.zero_grad()
        opt_b.zero_grad()
        (model2(x) - y).square().mean().backward()
        opt_a.step()
        opt_b.step()
    assert torch.equal(flat(model), flat(model2))


@pytest.mark.parametrize("name", ["ngn", "ngn_m", "sam", "asam", "sam_adamw"])
def test_param_group_with_zero_lr_stays_while_the_other_moves(name):
    data = make_data()
    model = make_model()
    before = copy.deepcopy(model)
    opt = OPTIMIZERS[name]([{"params": model.net[0].parameters()}, {"params": model.net[2].parameters()}])
    opt.param_groups[0]["lr"] = 0.0  # as a scheduler may set it (NGN refuses lr=0 at construction)
    train(model, opt, data, 3)
    for p, q in zip(model.net[0].parameters(), before.net[0].parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(model.net[2].weight, before.net[2].weight)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_maximize_equals_minimizing_the_negated_loss(name):
    data = make_data()
    model, model2 = make_model(), make_model()
    train(model, OPTIMIZERS[name](model.parameters()), data, 4)
    train(model2, OPTIMIZERS[name](model2.parameters(), maximize=True), data, 4, sign=-1.0)
    torch.testing.assert_close(flat(model2), flat(model), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_without_grad_are_skipped(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, make_data(), 2)
    assert torch.equal(model.unused, torch.ones(4, dtype=torch.float64))
    assert model.unused not in opt.state or not opt.state[model.unused]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreach_equals_single_tensor(name, device):
    data = make_data(device=device)
    model, model2 = make_model(device=device), make_model(device=device)
    train(model, OPTIMIZERS[name](model.parameters(), foreach=False), data, 5)
    train(model2, OPTIMIZERS[name](model2.parameters(), foreach=True), data, 5)
    torch.testing.assert_close(flat(model2), flat(model), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if not n.startswith(("sam", "asam"))])
def test_step_leaves_gradients_untouched(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), maximize=True)
    x, y = make_data()
    loss = -(model(x) - y).square().mean()
    loss.backward()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in with_grad]
    if isinstance(opt, NGN):
        opt.step(loss=loss)
    else:
        opt.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, with_grad, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "sam_adamw"])  # torch AdamW overflows in fp16
def test_low_precision_parameters_follow_the_fp32_step(name, dtype, device):
    data32 = make_data(torch.float32, device)
    model32, model = make_model(torch.float32, device), make_model(dtype, device)
    opt = OPTIMIZERS[name](model.parameters())
    train(model32, OPTIMIZERS[name](model32.parameters()), data32, 1)
    train(model, opt, make_data(dtype, device), 1)
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(t.dtype == dtype for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim)
    # one step in low precision: within a few ulps of the parameters plus one lr of a flipped sign
    torch.testing.assert_close(flat(model), flat(model32), rtol=2e-2, atol=2.5e-2)


@pytest.mark.parametrize("name", ["lion", "signum", "ngn", "sam"])
def test_works_with_an_lr_scheduler(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    data = make_data()
    for _ in range(3):
        train(model, opt, data, 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 / 8)
    if isinstance(opt, SAM):
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(lr0 / 8)


def test_grouping_and_foreach_default_match_torch_private_helpers():
    """_common writes out two private torch.optim helpers with public APIs; where torch still has them,
    ours agree (grouping by device and dtype in first-appearance order; foreach only on CUDA)."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    from hildtools.optimizers._common import by_device_and_dtype, use_foreach

    dtypes = [torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float64]
    tensors = [torch.full((2,), float(i), dtype=dtype) for i, dtype in enumerate(dtypes)]
    others = [t.clone() + 10 for t in tensors]

    def pointers(groups):
        return {lists[0][0].dtype: [[t.data_ptr() for t in ts] for ts in lists] for lists in groups}

    ours = pointers(by_device_and_dtype(tensors, others))
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype([tensors, others])
    assert ours == pointers(lists for lists, _ in grouped.values())
    assert len(ours) == 3
    params = [torch.nn.Parameter(t) for t in tensors]
    assert use_foreach(None, params) == _default_to_fused_or_foreach(params, False, False)[1] is False
    assert use_foreach(True, params) and not use_foreach(False, params)
