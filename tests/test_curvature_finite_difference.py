"""Gradient-only Hessian-vector products (finite differences) and the ``hvp="auto"`` choice: eigenvalues against
the dense fp64 Hessian in fp32 and for bf16 weights, the error estimate, ``once_differentiable`` functions (silently
wrong double backward) and fused attention without double backward detected and switched, ReLU kinks keeping
double backward, SDPA's flash kernel giving the math kernel's curvature."""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from ddp_utils import run_ranks
from test_curvature_reference import (
    MODELS,
    classification_batch,
    cross_entropy,
    dense_hessian,
    mlp,
)
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from hildtools.callbacks import HessianEigenMonitor
from hildtools.curvature import (
    HessianOperator,
    hessian_eigenpairs,
    hessian_trace,
    spectral_density,
)
from hildtools.curvature.finite_difference import finite_difference_step

SMOOTH = ["mlp", "bn_train", "bn_eval"]


def reference(model, batch):
    """The dense Hessian in fp64 at the model's own (possibly rounded) weights, and its eigenvalues, descending."""
    hessian = dense_hessian(copy.deepcopy(model).double(), cross_entropy, (batch[0].double(), batch[1]))
    return hessian, torch.linalg.eigvalsh(hessian).flip(0)


@pytest.mark.parametrize("extrapolate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SMOOTH)
def test_top_eigenvalues_match_the_dense_hessian(name, dtype, extrapolate):
    """fp32 arithmetic (bf16 weights are differentiated in fp32): top-3 eigenvalues to 1e-4 relative."""
    model, batch = MODELS[name](dtype), classification_batch(name, dtype=dtype)
    hessian, exact = reference(model, batch)
    operator = HessianOperator(model, cross_entropy, batch, hvp="finite_difference", extrapolate=extrapolate)
    v = torch.randn(operator.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    product = operator.matvec(v).double()
    assert operator.dtype == torch.float32 and operator.hvp == "finite_difference"
    assert (product - hessian @ v).norm() <= 3e-4 * (hessian @ v).norm()
    assert operator.product_error > 0 if extrapolate else operator.product_error != operator.product_error  # NaN
    result = hessian_eigenpairs(model, cross_entropy, batch, k=3, tol=1e-6, hvp="finite_difference")
    assert torch.allclose(result.eigenvalues, exact[:3], rtol=1e-4)
    # the error bounds include the products' estimated error (rounding alone was exceeded: 1.0e-6 vs 9.5e-7)
    assert torch.all((result.eigenvalues - exact[:3]).abs() <= result.error_bounds)
    assert torch.all(result.error_bounds <= 1e-3 * exact[0])  # still informative (bn_train: 3e-4, pessimistic)


def test_float64_products_are_accurate_to_1e_8():
    model, batch = mlp(), classification_batch("mlp")
    hessian = dense_hessian(model, cross_entropy, batch)
    operator = HessianOperator(model, cross_entropy, batch, hvp="finite_difference")
    v = torch.randn(operator.size, dtype=torch.float64)
    assert (operator.matvec(v) - hessian @ v).norm() <= 1e-8 * (hessian @ v).norm()


def test_error_estimate_is_small_when_smooth_and_large_across_max_pool_kinks():
    smooth = HessianOperator(
        mlp(torch.float32), cross_entropy, classification_batch("mlp", dtype=torch.float32), hvp="finite_difference"
    )
    kinked = HessianOperator(
        MODELS["cnn"](torch.float32),
        cross_entropy,
        classification_batch("cnn", dtype=torch.float32),
        hvp="finite_difference",
    )
    for operator in (smooth, kinked):
        operator.matvec(torch.randn(operator.size, generator=torch.Generator().manual_seed(0)))
    assert smooth.last_error < 1e-3
    assert kinked.last_error > 1e-2


def test_step_formula():
    """h = 0.1 u^(1/5) ||theta|| / ||v|| extrapolated, 0.1 u^(1/3) ||theta|| / ||v|| plain; ||theta|| = 0 -> 1."""
    u = torch.finfo(torch.float32).eps
    assert finite_difference_step(torch.float32, 4.0, 2.0) == pytest.approx(0.1 * u**0.2 * 2.0)
    assert finite_difference_step(torch.float32, 4.0, 2.0, extrapolate=False) == pytest.approx(0.1 * u ** (1 / 3) * 2)
    assert finite_difference_step(torch.float64, 0.0, 1.0) == pytest.approx(0.1 * torch.finfo(torch.float64).eps ** 0.2)


def test_trace_and_density_accept_finite_differences():
    model, batch = mlp(), classification_batch("mlp")
    density = spectral_density(model, cross_entropy, batch, num_steps=10, hvp="autograd")
    by_differences = spectral_density(model, cross_entropy, batch, num_steps=10, hvp="finite_difference")
    assert torch.allclose(by_differences.nodes, density.nodes, rtol=1e-6, atol=1e-9)
    exact = hessian_trace(model, cross_entropy, batch, num_samples=30, seed=3, hvp="autograd")
    by_differences = hessian_trace(model, cross_entropy, batch, num_samples=30, seed=3, hvp="finite_difference")
    assert by_differences.estimate == pytest.approx(exact.estimate, rel=1e-7)


class OnceDifferentiableCrossEntropy(torch.autograd.Function):
    """A fused loss whose backward is ``once_differentiable``: double backward silently drops its Hessian."""

    @staticmethod
    def forward(ctx, logits, target):
        ctx.save_for_backward(logits, target)
        return nn.functional.cross_entropy(logits, target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, target = ctx.saved_tensors
        probabilities = logits.softmax(1)
        probabilities[torch.arange(len(target)), target] -= 1
        return grad * probabilities / len(target), None


def fused_cross_entropy(model, batch):
    return OnceDifferentiableCrossEntropy.apply(model(batch[0]), batch[1])


def test_once_differentiable_loss_is_detected_and_finite_differences_are_used():
    model, batch = mlp(torch.float32), classification_batch("mlp", dtype=torch.float32)
    _, exact = reference(model, batch)
    wrong = hessian_eigenpairs(model, fused_cross_entropy, batch, k=2, tol=1e-6, hvp="autograd").eigenvalues
    assert not torch.allclose(wrong, exact[:2], rtol=1e-2)  # what double backward alone would report
    with pytest.warns(UserWarning, match="double backward disagrees with finite differences"):
        result = hessian_eigenpairs(model, fused_cross_entropy, batch, k=2, tol=1e-6)
    assert torch.allclose(result.eigenvalues, exact[:2], rtol=1e-4)
    with pytest.warns(UserWarning, match="disagrees"):  # the check extrapolates even for plain products
        assert HessianOperator(model, fused_cross_entropy, batch, extrapolate=False).hvp == "finite_difference"


class OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class FusedActivationMLP(nn.Module):
    def __init__(self, reference):
        super().__init__()
        self.net = copy.deepcopy(reference)

    def forward(self, x):
        net = self.net
        return net[4](OnceDifferentiableTanh.apply(net[2](OnceDifferentiableTanh.apply(net[0](x)))))


def test_once_differentiable_activation_is_detected():
    model, batch = mlp(torch.float32), classification_batch("mlp", dtype=torch.float32)
    _, exact = reference(model, batch)
    with pytest.warns(UserWarning, match="using finite differences"):
        operator = HessianOperator(FusedActivationMLP(model), cross_entropy, batch)
    assert operator.hvp == "finite_difference"
    values = hessian_eigenpairs(
        FusedActivationMLP(model), cross_entropy, batch, k=2, tol=1e-6, hvp="finite_difference"
    ).eigenvalues
    assert torch.allclose(values, exact[:2], rtol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "bn_train"])
def test_auto_keeps_exact_double_backward_silently(name):
    model, batch = MODELS[name](torch.float32), classification_batch(name, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HessianOperator(model, cross_entropy, batch).hvp == "autograd"


def test_auto_compares_with_finite_differences_only_where_a_custom_function_could_be_wrong(monkeypatch):
    """Built-in operations' double backward is exact or raises, so 'auto' spends the four gradients of a
    finite-difference product, and the parameter copy they start from, only when the loss's graph holds a custom
    autograd.Function."""
    calls = []
    for name in ("_differences", "_prepare_finite_differences"):
        method = getattr(HessianOperator, name)
        monkeypatch.setattr(
            HessianOperator, name, lambda self, *a, _m=method, _n=name, **k: calls.append(_n) or _m(self, *a, **k)
        )
    model, batch = mlp(torch.float32), classification_batch("mlp", dtype=torch.float32)
    assert HessianOperator(model, cross_entropy, batch).hvp == "autograd" and not calls
    with pytest.warns(UserWarning, match="using finite differences"):
        assert HessianOperator(FusedActivationMLP(model), cross_entropy, batch).hvp == "finite_difference"
    assert set(calls) == {"_differences", "_prepare_finite_differences"}


def test_auto_keeps_double_backward_across_relu_kinks():
    """Finite differences are unreliable across ReLU kinks (their error estimate says so): double backward, exact
    there, is kept and nothing is reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    batch = classification_batch("mlp", n=256, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HessianOperator(model, cross_entropy, batch).hvp == "autograd"


class Attention(nn.Module):
    """One self-attention layer with ``scaled_dot_product_attention`` and a tanh head (a smooth loss)."""

    def __init__(self, width=8, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, 3)
        self.kernels = []  # the autograd node of every differentiable SDPA call: which kernel ran

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if attended.grad_fn is not None:
            self.kernels.append(type(attended.grad_fn).__name__)
        return self.out(torch.tanh(attended.transpose(1, 2).reshape(b, t, w).mean(1)))


def attention_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_fused_attention_kernel_gives_the_math_kernel_curvature():
    """CPU's fused SDPA kernel (flash) has no double backward: 'auto' switches to finite differences, whose
    eigenvalues on the fused kernel equal double backward's on the math kernel."""
    model, batch = Attention(), attention_batch()
    with sdpa_kernel([SDPBackend.MATH]):
        exact = hessian_eigenpairs(model, cross_entropy, batch, k=2, tol=1e-6, hvp="autograd").eigenvalues
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with pytest.raises(RuntimeError, match="derivative for"):
            HessianOperator(model, cross_entropy, batch, hvp="autograd").matvec(
                torch.ones(sum(p.numel() for p in model.parameters()))
            )
        with pytest.warns(UserWarning, match="double backward fails"):
            fused = hessian_eigenpairs(model, cross_entropy, batch, k=2, tol=1e-6).eigenvalues
    assert torch.allclose(fused, exact, rtol=1e-4)


@pytest.mark.parametrize("function", [hessian_eigenpairs, hessian_trace, spectral_density])
def test_unknown_hvp_is_refused(function):
    with pytest.raises(ValueError, match="hvp"):
        function(mlp(), cross_entropy, classification_batch("mlp"), hvp="fd")


class AttentionModule(pl.LightningModule):
    """Trains with SDPA's default choice (the fused kernel on CPU)."""

    def __init__(self):
        super().__init__()
        self.model = Attention()

    def training_step(self, batch, batch_idx):
        return cross_entropy(self.model, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitor_keeps_the_fused_kernel_with_finite_differences():
    """With hvp="finite_difference" the probe no longer forces SDPA's math kernel; with "autograd" it does; both
    monitors report the same eigenvalues."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = attention_batch()
    eigenvalues, kernels = {}, {}
    for hvp in ("finite_difference", "autograd"):
        module = AttentionModule()
        monitor = HessianEigenMonitor(
            k=2, every_n_steps=2, tol=1e-6, probe_data=(x, y), hvp=hvp, measure_at_start=False
        )
        pl.Trainer(
            max_steps=2,
            callbacks=[monitor],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
        eigenvalues[hvp] = [monitor.last_metrics[f"hessian/eig_{i}"] for i in range(2)]
        kernels[hvp] = {"Flash" in name for name in module.model.kernels}
    assert torch.allclose(
        torch.tensor(eigenvalues["finite_difference"]), torch.tensor(eigenvalues["autograd"]), rtol=1e-4
    )
    assert kernels == {"finite_difference": {True}, "autograd": {True, False}}  # the probe's forwards: math


def _distributed_product(rank, world_size):
    model, (x, y) = mlp(), classification_batch("mlp")
    shard = slice(rank * 24, rank * 24 + 24)
    operator = HessianOperator(model, cross_entropy, (x[shard], y[shard]), hvp="finite_difference")
    v = torch.randn(operator.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return operator.matvec(v), dense_hessian(model, cross_entropy, (x, y)) @ v


def test_ddp_products_are_those_of_the_full_batch():
    (first, expected), (second, _) = run_ranks(_distributed_product)
    assert torch.equal(first, second)
    assert (first - expected).norm() <= 1e-8 * expected.norm()


class BatchNormModule(pl.LightningModule):
    def __init__(self, optimizer):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        return cross_entropy(self.net, batch)

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=0.01)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_monitors_with_finite_differences_leave_training_bitwise_identical(optimizer):
    """BatchNorm statistics, dropout's RNG, Adam's state (read for the preconditioned sharpness), .grad."""
    from torch.utils.data import DataLoader, TensorDataset

    from hildtools.callbacks import EdgeOfStabilityMonitor

    x, y = classification_batch("mlp", n=64, dtype=torch.float32)
    states = []
    for with_monitors in (False, True):
        module = BatchNormModule(optimizer)
        monitors = [
            HessianEigenMonitor(k=2, every_n_steps=2, probe_size=32, hvp="finite_difference", trace=True),
            EdgeOfStabilityMonitor(every_n_steps=2, probe_size=32, hvp="finite_difference"),
        ]
        pl.Trainer(
            max_steps=6,
            callbacks=monitors if with_monitors else [],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(
            module,
            DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)),
        )
        states.append(module.state_dict())
        if with_monitors:
            assert all(m.last_metrics and m.method == "finite_difference" for m in monitors)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.gpu
def test_cuda_memory_efficient_attention_gives_the_math_kernel_curvature():
    """On CUDA (fp32): SDPA's memory-efficient kernel, which has no double backward, through finite differences,
    against double backward on the math kernel. Skipped without a GPU."""
    model = Attention().cuda()
    batch = tuple(t.cuda() for t in attention_batch())
    with sdpa_kernel([SDPBackend.MATH]):
        exact = hessian_eigenpairs(model, cross_entropy, batch, k=2, tol=1e-6, hvp="autograd").eigenvalues
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        fused = hessian_eigenpairs(model, cross_entropy, batch, k=2, tol=1e-6, hvp="finite_difference").eigenvalues
    assert torch.allclose(fused, exact, rtol=1e-3)
