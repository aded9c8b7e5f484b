# ruff: noqa: B023  (the closures are called within their loop iteration, as in upstream's tests)
"""torch's generic optimizer tests, run against Lion, Signum, NGN and SAM.

torch ships ``OptimizerInfo`` (``torch.testing._internal.common_optimizers``) but not the tests that use
it: those are ``TestOptimRenewed`` in pytorch's ``test/test_optim.py``. The test bodies below are
adapted from it (pytest instead of the device-type harness, CPU, ``torch.testing.assert_close``
instead of ``TestCase.assertEqual``); each keeps its upstream name. Adaptations:

- NGN and SAM are registered with ``step_requires_closure=True`` (NGN needs the loss, SAM evaluates
  twice), so the upstream branches for closure-driven optimizers apply to them.
- NGN needs a non-negative loss: where upstream draws a random loss, it is ``|randn|`` here, and NGN's
  inputs leave out ``maximize`` (which needs a non-positive objective; tested in test_optim_conventions).
- ``test_mixed_device_dtype`` needs two GPUs upstream; here it mixes dtypes on one device.
- foreach variants run on CPU too (torch's helper adds them only on CUDA).
"""

import copy
import functools
import io

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from hildtools.optimizers import NGN, SAM, Lion, Signum

pytest.importorskip("expecttest", reason="torch's internal test helpers import expecttest (in the test extra)")
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

# Importing torch's internal test utilities calls torch.backends.disable_global_flags(), after which every later
# Trainer in this pytest process fails setting cudnn flags; undo it (torch has no public inverse).
torch.backends.disable_global_flags.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert not torch.backends.flags_frozen()


def lion_inputs(device=None, dtype=None):
    return [
        OptimizerInput(None, {"lr": 0.01}, "default betas"),
        OptimizerInput(None, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}, "weight decay"),
        OptimizerInput(None, {"lr": torch.tensor(0.01)}, "tensor lr"),
        OptimizerInput(None, {"lr": 0.01, "maximize": True}, "maximize"),
    ]


def signum_inputs(device=None, dtype=None):
    return [
        OptimizerInput(None, {"lr": 0.01}, "momentum 0.9"),
        OptimizerInput(None, {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.1}, "signSGD, weight decay"),
        OptimizerInput(None, {"lr": 0.01, "momentum": 0.8, "nesterov": True}, "nesterov"),
        OptimizerInput(None, {"lr": 0.01, "maximize": True}, "maximize"),
    ]


def ngn_inputs(device=None, dtype=None):
    return [
        OptimizerInput(None, {"lr": 0.5}, "NGN"),
        OptimizerInput(None, {"lr": 0.5, "weight_decay": 0.01}, "NGN, weight decay"),
        OptimizerInput(None, {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01}, "NGN-M, weight decay"),
    ]


def sam_inputs(device=None, dtype=None):
    return [
        OptimizerInput(None, {"base_optimizer": SGD, "lr": 0.01}, "SGD"),
        OptimizerInput(None, {"base_optimizer": SGD, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}, "momentum"),
        OptimizerInput(None, {"base_optimizer": SGD, "lr": 0.01, "adaptive": True, "eta": 0.01}, "ASAM"),
        OptimizerInput(None, {"base_optimizer": AdamW, "lr": 0.01}, "AdamW"),
        OptimizerInput(None, {"base_optimizer": SGD, "lr": 0.01, "maximize": True}, "maximize"),
    ]


def errors(cls, base):
    def inputs(device=None, dtype=None):
        bad = [({"lr": -1.0}, ValueError, "lr"), ({"weight_decay": -0.1}, ValueError, "weight_decay"),
               ({"maximize": 1}, TypeError, "maximize"), ({"foreach": "yes"}, TypeError, "foreach")]  # fmt: skip
        if cls is NGN:
            bad.append(({"lr": 0.0}, ValueError, "lr"))
        if cls is SAM:
            bad = [({"rho": -1.0}, ValueError, "rho"), ({"eta": -1.0}, ValueError, "eta")]
        params = [Parameter(torch.zeros(2))]
        return [
            ErrorOptimizerInput(OptimizerInput(params, {**base, **kwargs}), error_type=error, error_regex=regex)
            for kwargs, error, regex in bad
        ]

    return inputs


INFOS = [
    OptimizerInfo(Lion, optim_inputs_func=lion_inputs, optim_error_inputs_func=errors(Lion, {}),
                  supported_impls=("foreach",), not_og_supported_flags=("foreach", "maximize", "compiled")),
    OptimizerInfo(Signum, optim_inputs_func=signum_inputs, optim_error_inputs_func=errors(Signum, {"lr": 0.1}),
                  supported_impls=("foreach",), not_og_supported_flags=("foreach", "maximize", "compiled")),
    OptimizerInfo(NGN, optim_inputs_func=ngn_inputs, optim_error_inputs_func=errors(NGN, {}),
                  supported_impls=("foreach",), not_og_supported_flags=("foreach", "maximize"),
                  step_requires_closure=True),
    OptimizerInfo(SAM, optim_inputs_func=sam_inputs, optim_error_inputs_func=errors(SAM, {"base_optimizer": SGD}),
                  supported_impls=("foreach",), not_og_supported_flags=("foreach", "maximize"),
                  step_requires_closure=True),
]  # fmt: skip
by_info = pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
DTYPE = torch.float32


def all_inputs(info):
    """Every input with foreach False and True (upstream's helper adds foreach=True only on CUDA)."""
    return [
        OptimizerInput(None, {**copy.deepcopy(i.kwargs), "foreach": flag}, f"{i.desc}, foreach={flag}")
        for i in info.optim_inputs_func()
        for flag in (False, True)
    ]


def take_step(info, optimizer, closure):
    """Upstream's two ways to step: closure-driven optimizers get it, the others see it called first."""
    if info.step_requires_closure:
        return optimizer.step(closure)
    loss = closure()
    optimizer.step()
    return loss


def linear_problem(device="cpu", dtype=DTYPE, contiguous=True):
    if contiguous:
        weight, bias = Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    else:
        weight = Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def fwd_bwd(optim, w, b, i):
    optim.zero_grad()
    loss = (w.mv(i) + b).pow(2).sum()
    loss.backward()
    return loss


def assert_equal(actual, expected, **tolerances):
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerances)


@by_info
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info):
    for optim_input in info.optim_inputs_func():
        assert not any(flag in optim_input.kwargs for flag in ("foreach", "fused", "compiled", "differentiable"))


@by_info
def test_errors(info):
    for error_input in info.optim_error_inputs_func():
        optim_input = error_input.optimizer_error_input
        assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            info.optim_cls(optim_input.params, **optim_input.kwargs)


@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@by_info
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    for schedulers_constructor in info.scheduler_inputs if with_lrsched else [None]:
        for optim_input in info.optim_inputs_func():
            kwargs = {**optim_input.kwargs, "foreach": False}
            weight, bias, inpt = linear_problem(contiguous=contiguous)
            optimizer = info.optim_cls([weight, bias], **kwargs)
            schedulers = [s(optimizer) for s in schedulers_constructor or []]
            closure = functools.partial(fwd_bwd, optimizer, weight, bias, inpt)

            initial_value = closure().item()
            for _ in range(20):
                loss = take_step(info, optimizer, closure)
                for scheduler in schedulers:
                    scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            final_value = closure().item()
            if kwargs.get("maximize", False):
                assert final_value > initial_value, optim_input.desc
            else:
                assert final_value < initial_value, optim_input.desc


@by_info
def test_param_group_with_lrscheduler_goes_right_direction(info):
    if info.optim_cls is Signum:
        pytest.skip(
            "Signum has no default lr (sign methods need a problem-specific one); upstream leaves one group without lr"
        )
    extra = {"base_optimizer": SGD} if info.optim_cls is SAM else {}
    for schedulers_c in info.scheduler_inputs:
        weight, bias, inpt = linear_problem()
        optimizer = info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}], **extra)
        schedulers = [scheduler_c(optimizer) for scheduler_c in schedulers_c]
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, inpt)

        initial_value = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            for scheduler in schedulers:
                scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
        assert closure().item() < initial_value


@by_info
def test_tensor_lr(info):
    for optim_input in all_inputs(info):
        weight, bias, inpt = linear_problem()
        weight_c, bias_c = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        kwargs = optim_input.kwargs
        kwargs["lr"] = 1.0 if info.optim_cls is NGN else 1e-3
        optimizer_r = info.optim_cls([weight, bias], **kwargs)
        kwargs["lr"] = torch.tensor(kwargs["lr"])
        try:
            optimizer = info.optim_cls([weight_c, bias_c], **kwargs)
        except ValueError as error:  # as upstream: a base optimizer (AdamW foreach) may refuse a tensor lr
            assert "lr as a Tensor is not supported" in str(error)
            continue

        def closure(optim, w, b):
            optim.zero_grad()
            loss = (w.mv(inpt) + b).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            take_step(info, optimizer_r, functools.partial(closure, optimizer_r, weight, bias))
            take_step(info, optimizer, functools.partial(closure, optimizer, weight_c, bias_c))
            assert_equal(weight, weight_c)
            assert_equal(bias, bias_c)


@by_info
def test_complex(info):
    """A complex parameter steps as its view_as_real pair would (torch.optim's convention)."""
    for optim_input in all_inputs(info):
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, dtype=torch.float32, requires_grad=True),  # mixing real and complex
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in complex_params
        ]
        complex_optimizer = info.optim_cls(complex_params, **optim_input.kwargs)
        real_optimizer = info.optim_cls(real_params, **optim_input.kwargs)
        real_steps, complex_steps, grads_losses = [], [], []

        def real_closure():
            for param in real_params:
                grad = torch.randn_like(param)
                param.grad = grad
                real_steps.append(param.detach().clone())
                grads_losses.append(grad.clone())
            loss = torch.randn(1).abs()  # NGN needs a non-negative loss
            grads_losses.append(loss.clone())
            return loss

        def complex_closure():
            for param in complex_params:
                if torch.is_complex(param):
                    grad = torch.view_as_complex(grads_losses.pop(0))
                    complex_steps.append(torch.view_as_real_copy(param.detach()))
                else:
                    grad = grads_losses.pop(0)
                    complex_steps.append(param.detach().clone())
                param.grad = grad
            return grads_losses.pop(0)

        for _ in range(3):
            take_step(info, real_optimizer, real_closure)
            take_step(info, complex_optimizer, complex_closure)
        as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
        assert_equal(as_real, real_params)
        assert_equal(complex_steps, real_steps)


def rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@by_info
def test_complex_2d(info):
    # NGN and SAM take one norm over (re, im) pairs here and over two tensors there: equal up to
    # rounding, so a seed and upstream's tolerance for LBFGS (which has the same reduction)
    torch.manual_seed(2024)
    for optim_input in all_inputs(info):
        kwargs = {**optim_input.kwargs, "lr": 1e-4 if info.optim_cls is not NGN else 1e-2}
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real, a1_imag = a1.real.detach().clone().requires_grad_(), a1.imag.detach().clone().requires_grad_()
        optim1 = info.optim_cls([a1], **kwargs)
        optim2 = info.optim_cls([a1_real, a1_imag], **kwargs)

        tracked = []  # upstream's TensorTracker: closure2 checks and adopts what closure1 saw

        def closure1():
            optim1.zero_grad()
            loss = rosenbrock(a1).abs()
            loss.backward()
            tracked.extend(t.detach().clone() for t in (a1.real, a1.imag, loss, a1.grad.real, a1.grad.imag))
            return loss

        def pop_check_set(tensor):
            expected = tracked.pop(0)
            assert_equal(tensor, expected, rtol=4.5e-5, atol=5e-5)
            with torch.no_grad():
                tensor.copy_(expected)

        def closure2():
            optim2.zero_grad()
            pop_check_set(a1_real)
            pop_check_set(a1_imag)
            loss = rosenbrock(torch.complex(a1_real, a1_imag)).abs()
            pop_check_set(loss.detach())
            loss.backward()
            pop_check_set(a1_real.grad)
            pop_check_set(a1_imag.grad)
            return loss

        for _ in range(3):
            take_step(info, optim1, closure1)
            take_step(info, optim2, closure2)
            assert_equal(a1.real, a1_real, rtol=4.5e-5, atol=5e-5)
            assert_equal(a1.imag, a1_imag, rtol=4.5e-5, atol=5e-5)
        assert not tracked


def compare_between(info, inputs, models, optimizers, tolerances, desc=""):
    """Upstream's ``_compare_between``: 7 steps; a frozen layer at steps 3-4; no gradients at step 2.
    After each step the parameters and states must agree; the first run's values are then copied
    into the second so that differences do not compound."""
    for i in range(7):
        updated = []
        for inpt, model, optimizer in zip(inputs, models, optimizers, strict=True):
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)

            def closure(model=model, optimizer=optimizer, inpt=inpt):
                optimizer.zero_grad()
                loss = model(inpt).sum()
                if i != 2:  # a step with every gradient None is a no-op
                    loss.backward()
                return loss.detach()

            if info.step_requires_closure:
                optimizer.step(closure)
            else:
                optimizer.zero_grad()
                if i != 2:
                    model(inpt).sum().backward()
                optimizer.step()
            updated.append(list(model.parameters()))
        for p, q in zip(*updated, strict=True):
            assert_equal(q, p, **tolerances, msg=lambda m: f"{desc}, step {i}: {m}")
            for key, value in optimizers[0].state[p].items():
                assert_equal(optimizers[1].state[q][key], value, **tolerances, msg=lambda m: f"{desc}, {key}: {m}")
            with torch.no_grad():
                q.copy_(p)
                for key, value in optimizers[0].state[p].items():
                    if torch.is_tensor(value):
                        optimizers[1].state[q][key].copy_(value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@by_info
def test_foreach_matches_forloop(info, dtype):
    """Upstream runs it in fp64; the fp16 run uses the tolerance of upstream's mixed-dtype test (5x the
    single-op one): foreach and for-loop kernels may round an fp16 result to neighbouring values."""
    tolerances = {"atol": 5e-5, "rtol": 5e-3} if dtype == torch.float16 else {}
    for optim_input in info.optim_inputs_func():
        models, optimizers = [], []
        for flag in (False, True):
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                        torch.nn.Sigmoid()).to(dtype)  # fmt: skip
            empty_param = torch.empty((), dtype=dtype, requires_grad=True)  # a 0-dim param last (pytorch#100701)
            empty_param.grad = torch.rand_like(empty_param)
            models.append(model)
            optimizers.append(info.optim_cls([*model.parameters(), empty_param], **optim_input.kwargs, foreach=flag))
        inpt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        compare_between(info, [inpt, inpt], models, optimizers, tolerances, optim_input.desc)


@by_info
def test_mixed_dtypes(info):
    """Upstream's test_mixed_device_dtype on one device: fp64, fp32, fp16 and bf16 parameters in one
    optimizer, 7 steps, foreach == for-loop within 5x the single-op tolerance of each dtype."""
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    torch.manual_seed(0)
    params = [torch.rand(2, 3, dtype=dtype, requires_grad=True) for dtype in dtypes]
    grads = [torch.rand_like(p) for p in params]
    for optim_input in info.optim_inputs_func():
        updated, states = [], []
        for flag in (False, True):
            clones = [p.detach().clone().requires_grad_() for p in params]

            def closure(clones=clones):
                for p, g in zip(clones, grads, strict=True):
                    p.grad = g.clone()
                return torch.tensor(0.7)

            optimizer = info.optim_cls(clones, **optim_input.kwargs, foreach=flag)
            for _ in range(7):
                if info.step_requires_closure:
                    optimizer.step(closure)
                else:
                    closure()
                    optimizer.step()
            updated.append(clones)
            states.append(optimizer.state)
        for p, q in zip(*updated, strict=True):
            rtol, atol = torch.testing._comparison.get_tolerances(p.dtype, rtol=None, atol=None)
            tolerances = {"rtol": 5 * rtol, "atol": 5 * atol}
            assert_equal(q, p, **tolerances, msg=lambda m, p=p, d=optim_input.desc: f"{d}, {p.dtype}: {m}")
            for key, value in states[0][p].items():
                assert_equal(states[1][q][key], value, **tolerances)


@by_info
def test_param_groups_weight_decay(info):
    for optim_input in all_inputs(info):
        weight_kwargs = optim_input.kwargs
        bias_kwargs = {**copy.deepcopy(weight_kwargs), "weight_decay": 0.0}
        weight, bias, inpt = linear_problem()
        optimizer = info.optim_cls([dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)],
                                   **_required(info))  # fmt: skip
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, inpt)

        initial_value = closure().item()
        for _ in range(20):
            loss = take_step(info, optimizer, closure)
        if weight_kwargs.get("maximize", False):
            assert loss.item() > initial_value
        else:
            assert loss.item() < initial_value


def _required(info):
    # SAM's base optimizer is a constructor argument, not a param-group option
    return {"base_optimizer": SGD} if info.optim_cls is SAM else {}


@by_info
def test_param_groups_lr(info):
    for optim_input in all_inputs(info):
        group_kwargs = optim_input.kwargs
        if not group_kwargs.get("lr"):
            group_kwargs["lr"] = 1e-3
        weight, bias, inpt = linear_problem()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.clone()
        outer = {"lr": 1e-28, **_required(info)}
        optimizer = info.optim_cls([{"params": [weight, bias], **group_kwargs}, {"params": [irrelevant]}], **outer)

        def closure():
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            return loss

        initial_value = closure().item()
        for _ in range(20):
            loss = take_step(info, optimizer, closure)
        if group_kwargs.get("maximize", False):
            assert loss.item() > initial_value
        else:
            assert loss.item() < initial_value
        assert_equal(irrelevant, irrelevant_clone)  # lr almost 0


@by_info
def test_step_is_noop_when_params_have_no_grad(info):
    params = [torch.randn(2, 3) for _ in range(2)]
    old_params = [p.clone() for p in params]
    for optim_input in all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        assert optimizer.step(lambda: torch.tensor([1.0])).item() == 1.0  # the closure's loss comes back
    assert_equal(params, old_params)


@by_info
def test_step_is_noop_for_zero_grads(info):
    param = torch.randn((5, 1), requires_grad=True)
    old_param = param.detach().clone()
    for optim_input in all_inputs(info):
        if optim_input.kwargs.get("weight_decay", 0) != 0 or optim_input.kwargs.get("base_optimizer") is AdamW:
            continue  # decay (AdamW's by default) moves parameters without gradients
        optimizer = info.optim_cls([param], **optim_input.kwargs)

        def closure():
            param.grad = torch.zeros_like(param)  # SAM clears the gradients between its two passes
            return torch.tensor([1.0])

        closure()
        optimizer.step(closure)
        assert_equal(param, old_param)


@by_info
def test_optimizer_can_be_printed(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in all_inputs(info):
        assert info.optim_cls.__name__ in repr(info.optim_cls(params, **optim_input.kwargs))


@pytest.mark.parametrize("named", [False, True])
@by_info
def test_state_dict_deterministic(info, named):
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    inpt = torch.randn(3)

    def maybe_named(params):
        return [(f"name{i}", p) for i, p in enumerate(params)] if named else params

    def without_names(state_dict):
        state_dict = copy.deepcopy(state_dict)
        for group in state_dict["param_groups"]:
            group.pop("param_names", None)
        return state_dict

    for optim_input in all_inputs(info):
        optimizer = info.optim_cls(maybe_named([weight, bias]), **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, inpt)
        for _ in range(10):
            take_step(info, optimizer, closure)
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = info.optim_cls(maybe_named([weight_c, bias_c]), **optim_input.kwargs)
        closure_c = functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c, inpt)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            take_step(info, optimizer, closure)
            take_step(info, optimizer_c, closure_c)
            assert_equal(weight, weight_c)
            assert_equal(bias, bias_c)
        assert_equal(without_names(optimizer.state_dict()), without_names(optimizer_c.state_dict()))
        optimizer_c.param_groups.extend(optimizer_c.param_groups)  # repeated parameters (pytorch#36831)
        assert_equal(without_names(optimizer.state_dict())["param_groups"][-1],
                     without_names(optimizer_c.state_dict())["param_groups"][-1])  # fmt: skip


@by_info
def test_can_load_older_state_dict(info):
    """A state dict saved before the newer flags existed loads, and the next step runs (``__setstate__``
    back-fills the flags, as torch.optim does)."""
    for optim_input in all_inputs(info):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
        inpt = torch.rand(1, 4, 16, 16)
        optimizer = info.optim_cls(model.parameters(), **optim_input.kwargs)

        def closure():
            optimizer.zero_grad()
            loss = model(inpt).square().sum()  # non-negative, for NGN
            loss.backward()
            return loss

        for _ in range(3):
            take_step(info, optimizer, closure)
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        for group in old_state_dict["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        optimizer.load_state_dict(old_state_dict)
        take_step(info, optimizer, closure)
        for group in optimizer.param_groups:
            assert {"maximize", "foreach"} <= group.keys()


@by_info
def test_save_load_equality_with_weights_only(info):
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    inpt = torch.randn(3)
    for optim_input in all_inputs(info):
        optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, inpt)
        for _ in range(3):
            optimizer.step(closure)
        state_dict = optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        assert_equal(torch.load(buffer, weights_only=True), state_dict)


@by_info
def test_state_dict_pre_post_hook(info):
    def pre_hook(optimizer):
        optimizer.state["test"] = 1

    def post_hook(optimizer, state_dict):
        state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    for optim_input in all_inputs(info):
        optim = info.optim_cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)
        optim.register_state_dict_pre_hook(pre_hook)
        optim.register_state_dict_post_hook(post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]


@by_info
def test_load_state_dict_pre_post_hook(info):
    def pre_hook(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.003
        return state_dict

    def post_hook(optimizer):
        optimizer.state["ran_post_hook_after_pre_hook"] = optimizer.param_groups[0]["lr"] == 0.003

    for optim_input in all_inputs(info):
        optim = info.optim_cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)
        optim.register_load_state_dict_pre_hook(pre_hook)
        optim.register_load_state_dict_post_hook(post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_post_hook_after_pre_hook"]


def dummy_closure():
    return 1


@by_info
def test_step_pre_and_post_hooks(info):
    """Upstream's test_step_pre_hook and test_step_post_hook: each fires once per step, until removed."""
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in all_inputs(info):
        optim = info.optim_cls(params, **optim_input.kwargs)
        data = []
        pre = optim.register_step_pre_hook(lambda *_: data.append("pre"))
        post = optim.register_step_post_hook(lambda *_: data.append("post"))
        optim.step(dummy_closure)
        optim.step(dummy_closure)
        assert data == ["pre", "post"] * 2
        pre.remove()
        post.remove()
        optim.step(dummy_closure)
        assert data == ["pre", "post"] * 2


@by_info
def test_step_all_hooks(info):
    """Global and local hooks in order, once per step: [global pre, local pre, local post, global post]."""
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in all_inputs(info):
        optim = info.optim_cls(params, **optim_input.kwargs)
        optim2 = SGD(params)
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda *_: data.append(0)),
            register_optimizer_step_post_hook(lambda *_: data.append(5)),
            optim.register_step_pre_hook(lambda *_: data.append(1)),
            optim.register_step_post_hook(lambda *_: data.append(2)),
            optim2.register_step_pre_hook(lambda *_: data.append(1)),
            optim2.register_step_post_hook(lambda *_: data.append(2)),
        ]
        try:
            optim.step(dummy_closure)
            assert data == [0, 1, 2, 5]
            optim2.step()
            assert data == [0, 1, 2, 5] * 2
            optim.step(dummy_closure)
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optim.step(dummy_closure)
        optim2.step()
        assert data == [0, 1, 2, 5] * 3


@by_info
def test_deepcopy_copies_all_public_attrs(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step(dummy_closure)
        clone = copy.deepcopy(optimizer)
        assert public(optimizer) == public(clone)
        assert_equal(clone.state_dict(), optimizer.state_dict())


@by_info
def test_non_empty_state(info):
    model = torch.nn.Linear(5, 5)
    inpt = torch.rand(2, 5)
    for optim_input in info.optim_inputs_func():
        kwargs = optim_input.kwargs
        stateless = kwargs.get("momentum", 0.9 if info.optim_cls is Signum else 0.0) == 0
        if stateless and info.optim_cls is not Lion and kwargs.get("base_optimizer", SGD) is SGD:
            continue  # stateless by design: signSGD, NGN without momentum, SAM over plain SGD
        optim = info.optim_cls(model.parameters(), **kwargs)

        def closure(optim=optim):
            optim.zero_grad()
            loss = model(inpt).square().sum()
            loss.backward()
            return loss

        take_step(info, optim, closure)
        assert optim.state and all(len(state) > 0 for state in optim.state.values()), optim_input.desc


def test_every_optimizer_is_covered():
    assert {info.optim_cls for info in INFOS} == {Lion, Signum, NGN, SAM}
    assert all(issubclass(info.optim_cls, Optimizer) for info in INFOS)
