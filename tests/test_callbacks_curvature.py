"""HessianEigenMonitor and EdgeOfStabilityMonitor: values against the dense Hessian, thresholds, edge of stability
reproduced, no side effects, resume state, bad input, skipped NaN measurements, clear setup errors."""

import math
import os
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor, InvariantSetMonitor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


class Regression(pl.LightningModule):
    def __init__(self, optimizer="sgd", lr=0.05, bn=False):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(6, 12)] + ([nn.BatchNorm1d(12)] if bn else []) + [nn.Tanh(), nn.Linear(12, 3)]
        self.net = nn.Sequential(*layers)
        self.optimizer, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        momentum = 0.9 if self.optimizer == "momentum" else 0.0
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=momentum)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def fit(module, callbacks, steps=8, **kwargs):
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, DataLoader(data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    return trainer


def dense_eigenvalues(module, batch, bn_train=False):
    """Eigenvalues (descending) of the dense fp64 Hessian of the probe loss at the module's current weights."""
    model = module.net.double()
    model.eval()
    if bn_train:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.train()
                m.track_running_stats = False
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = batch[0].double(), batch[1]

    def loss(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[i : i + math.prod(shape)].view(shape)
            i += math.prod(shape)
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    return torch.linalg.eigvalsh(hessian).flip(0)


@pytest.mark.parametrize("bn", [False, True])
def test_hessian_monitor_matches_dense_hessian(bn):
    module = Regression(bn=bn)
    monitor = HessianEigenMonitor(k=3, every_n_steps=4, probe_size=48, tol=1e-6, trace=True, trace_samples=200)
    fit(module, [monitor], steps=8)
    exact = dense_eigenvalues(module, monitor.probe.batch, bn_train=bn)
    measured = torch.tensor([monitor.last_metrics[f"hessian/eig_{i}"] for i in range(3)], dtype=torch.float64)
    assert torch.allclose(measured, exact[:3], rtol=1e-4)
    assert 0 <= monitor.last_metrics["hessian/overlap_prev"] <= 1 + 1e-6
    assert 0 <= monitor.last_metrics["hessian/overlap_init"] <= 1 + 1e-6
    assert monitor.last_metrics["hessian/trace"] == pytest.approx(float(exact.sum()), rel=0.25)


def test_monitors_leave_training_bitwise_identical():
    plain = Regression(bn=True)
    fit(plain, [], steps=10)
    probed = Regression(bn=True)
    monitors = [
        HessianEigenMonitor(k=2, every_n_steps=3, probe_size=32, trace=True),
        EdgeOfStabilityMonitor(every_n_steps=2, probe_size=32),
    ]
    fit(probed, monitors, steps=10)
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(a, b)
    assert all(m.last_metrics for m in monitors)


@pytest.mark.parametrize("optimizer, factor", [("sgd", 2.0), ("momentum", 3.8), ("adam", 38.0)])
def test_eos_monitor_threshold_per_optimizer(optimizer, factor):
    lr = 0.01
    monitor = EdgeOfStabilityMonitor(every_n_steps=4, probe_size=32)
    fit(Regression(optimizer, lr), [monitor], steps=8)
    metrics = monitor.last_metrics
    assert metrics["eos/threshold"] == pytest.approx(factor / lr)
    assert metrics["eos/ratio"] == pytest.approx(metrics["eos/sharpness"] / metrics["eos/threshold"])
    assert metrics["eos/at_edge"] == float(metrics["eos/ratio"] >= 0.9)


def test_edge_of_stability_reproduced_on_digits(tmp_path):
    """Full-batch GD on a tanh MLP over digits: sharpness rises to 2/lr and hovers there (Cohen et al. 2021)."""
    from edge_of_stability import ratios, run

    rows = run("gd", lr=0.2, steps=400, n=400, width=32, every_n_steps=10, out=str(tmp_path))
    early, median_ratio, _ = ratios(rows)
    assert early < 0.75  # sharpness starts well below the threshold (progressive sharpening) ...
    assert 0.85 <= median_ratio <= 1.15  # ... and then hovers at 2/lr


def test_resume_state_round_trips_with_weights_only(tmp_path):
    monitor = HessianEigenMonitor(k=2, every_n_steps=4, probe_size=32)
    fit(Regression(), [monitor], steps=8)
    path = tmp_path / "state.pt"
    torch.save(monitor.state_dict(), path)
    restored = HessianEigenMonitor(k=2, every_n_steps=4, probe_size=32)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.vectors, monitor.vectors.cpu())
    assert torch.equal(restored.init_vectors, monitor.init_vectors.cpu())
    assert restored.last_step == 8


@pytest.mark.parametrize(
    "make, state",
    [
        (lambda: EdgeOfStabilityMonitor(every_n_steps=4, probe_size=32), lambda n: {"vector": torch.ones(n)}),
        (lambda: HessianEigenMonitor(k=2, every_n_steps=4, probe_size=32), lambda n: {"vectors": torch.ones(n, 2)}),
    ],
)
def test_a_restored_warm_start_that_does_not_fit_the_model_is_dropped(make, state):
    """A checkpoint written by rank 0 holds its shard of the eigenvectors; on a rank whose shard is longer (or after
    the model changed) the monitors start cold instead of failing: the values equal a run without that state."""
    cold, stale = make(), make()
    stale.load_extra_state_dict(state(sum(p.numel() for p in Regression().parameters()) - 5))
    fit(Regression(), [cold], steps=4)
    fit(Regression(), [stale], steps=4)
    timeless = [{k: v for k, v in m.last_metrics.items() if not k.endswith("/seconds")} for m in (stale, cold)]
    assert timeless[0] and timeless[0] == timeless[1]


def test_two_hessian_monitors_with_different_k_checkpoint_separately(tmp_path):
    monitors = [
        HessianEigenMonitor(k=1, every_n_steps=4, probe_size=16),
        HessianEigenMonitor(k=2, every_n_steps=4, probe_size=16),
    ]
    trainer = fit(Regression(), monitors, steps=4)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert {m.state_key for m in monitors} <= set(saved) and monitors[0].state_key != monitors[1].state_key


def test_nan_probe_loss_skips_with_a_warning():
    def nan_loss(module, batch):
        return module.net(batch[0]).sum() * float("nan")

    monitor = EdgeOfStabilityMonitor(every_n_steps=4, probe_size=16, loss_fn=nan_loss)
    with pytest.warns(UserWarning, match="skipped"):
        fit(Regression(), [monitor], steps=4)
    assert monitor.last_metrics == {}


def test_unknown_optimizer_logs_sharpness_only_after_one_warning():
    class Rprop(Regression):
        def configure_optimizers(self):
            return torch.optim.Rprop(self.parameters())

    monitor = EdgeOfStabilityMonitor(every_n_steps=2, probe_size=16)
    with pytest.warns(UserWarning, match="no known stability threshold for Rprop"):
        fit(Rprop(), [monitor], steps=2)
    assert set(monitor.last_metrics) == {"eos/sharpness", "eos/sharpness_err", "eos/num_hvp", "eos/seconds"}


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_ngn_threshold_uses_its_self_tuned_step(momentum):
    from hildtools.optimizers import NGN

    class WithNGN(Regression):
        def configure_optimizers(self):
            return NGN(self.parameters(), lr=0.5, momentum=momentum)

    module = WithNGN()
    monitor = EdgeOfStabilityMonitor(every_n_steps=3, probe_size=16)
    fit(module, [monitor], steps=3)
    gamma = float(module.optimizers().optimizer.param_groups[0]["gamma"])
    assert 0 < gamma <= 0.5
    assert monitor.last_metrics["eos/threshold"] == pytest.approx((2 + 2 * momentum) / ((1 - momentum) * gamma))


class TanhGradWithoutDerivative(torch.autograd.Function):
    """Stands in for a fused kernel whose backward has no derivative (e.g. flash attention on GPU)."""

    @staticmethod
    def forward(ctx, grad, x):
        ctx.save_for_backward(x)
        return grad * (1 - x.tanh() ** 2)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the derivative for 'tanh_grad_fused' is not implemented.")


class FusedTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return TanhGradWithoutDerivative.apply(grad, x)


class Fused(Regression):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net[2](FusedTanh.apply(self.net[0](x))), y)


def test_model_without_double_backward_fails_at_fit_start_with_hvp_autograd():
    with pytest.raises(RuntimeError, match="double backward.*hvp='finite_difference'"):
        fit(Fused(), [HessianEigenMonitor(k=1, every_n_steps=2, probe_size=16, hvp="autograd")], steps=2)


def test_model_without_double_backward_switches_to_finite_differences():
    """hvp="auto": one warning at fit start, then the values of the same model without the fused op."""
    fused, plain = (
        HessianEigenMonitor(k=2, every_n_steps=2, probe_size=16),
        HessianEigenMonitor(k=2, every_n_steps=2, probe_size=16),
    )
    with pytest.warns(UserWarning, match="double backward fails.*using finite differences"):
        fit(Fused(), [fused], steps=2)
    fit(Regression(), [plain], steps=2)
    assert (fused.method, plain.method) == ("finite_difference", "autograd")
    for i in range(2):
        assert fused.last_metrics[f"hessian/eig_{i}"] == pytest.approx(plain.last_metrics[f"hessian/eig_{i}"], rel=1e-4)


@pytest.mark.parametrize("monitor", [HessianEigenMonitor(k=1, every_n_steps=2), InvariantSetMonitor()])
def test_deepspeed_is_refused_in_setup(monitor):
    """(FSDP runs are in test_fsdp.py. DeepSpeed is not installed here: an uninitialised instance stands in.)"""
    trainer = type("T", (), {"strategy": DeepSpeedStrategy.__new__(DeepSpeedStrategy)})()
    with pytest.raises(RuntimeError, match="DeepSpeedStrategy is not supported.*ddp"):
        monitor.setup(trainer, None, "fit")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"tol": 0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"max_iter": 1, "k": 3}, "max_iter"),
        ({"trace_samples": 1}, "trace_samples"),
        ({"bn_mode": "x"}, "bn_mode"),
        ({"probe_size": 0}, "probe_size"),
    ],
)
def test_hessian_monitor_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HessianEigenMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"edge_ratio": 0}, "edge_ratio"),
        ({"edge_ratio": 3}, "edge_ratio"),
        ({"optimizer_index": -1}, "optimizer_index"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_eos_monitor_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EdgeOfStabilityMonitor(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_monitors_on_cuda(precision):
    module = Regression(bn=True)
    monitors = [
        HessianEigenMonitor(k=2, every_n_steps=4, probe_size=32, tol=1e-5),
        EdgeOfStabilityMonitor(every_n_steps=4, probe_size=32),
    ]
    fit(module, monitors, steps=8, accelerator="gpu", devices=1, precision=precision)
    exact = dense_eigenvalues(module.cpu(), [t.cpu() for t in monitors[0].probe.batch], bn_train=True)
    assert monitors[0].last_metrics["hessian/eig_0"] == pytest.approx(float(exact[0]), rel=1e-3)
    assert math.isfinite(monitors[1].last_metrics["eos/sharpness"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: HessianEigenMonitor(k=1, every_n_epochs=1, probe_size=16),
        lambda: EdgeOfStabilityMonitor(every_n_epochs=1, probe_size=16),
    ],
)
def test_every_n_epochs_alone_measures_at_epoch_ends(make):
    monitor = make()
    assert (monitor.every_n_steps, monitor.every_n_epochs) == (None, 1)
    steps = []
    measure = monitor.measure
    monitor.measure = lambda trainer, *args: steps.append(trainer.global_step) or measure(trainer, *args)
    fit(Regression(), [monitor], steps=-1, max_epochs=2)  # 64 examples in batches of 16: 4 steps an epoch
    assert steps == [0, 4, 8] if monitor.measure_at_start else steps == [4, 8]


def test_curvature_monitors_default_to_every_100_steps():
    assert (HessianEigenMonitor().every_n_steps, HessianEigenMonitor().every_n_epochs) == (100, None)
    assert (EdgeOfStabilityMonitor().every_n_steps, EdgeOfStabilityMonitor().every_n_epochs) == (100, None)


def test_eos_param_groups_that_differ_raise_instead_of_a_wrong_warning():
    class TwoGroups(Regression):
        def configure_optimizers(self):
            first, second = self.net[0], self.net[-1]
            return torch.optim.SGD(
                [{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.01}], lr=self.lr
            )

    with pytest.raises(ValueError, match="param_group"):
        fit(TwoGroups(), [EdgeOfStabilityMonitor(every_n_steps=2, probe_size=16)], steps=2)
    monitor = EdgeOfStabilityMonitor(every_n_steps=2, probe_size=16, param_group=1)
    fit(TwoGroups(), [monitor], steps=2)
    assert monitor.last_metrics["eos/threshold"] == pytest.approx(2 / 0.01)


def test_eos_with_sam_compares_against_the_base_threshold():
    from hildtools.optimizers import SAM

    class WithSAM(Regression):
        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    monitor = EdgeOfStabilityMonitor(every_n_steps=2, probe_size=16)
    fit(WithSAM(), [monitor], steps=2)
    assert monitor.last_metrics["eos/threshold"] == pytest.approx(3.8 / 0.1)


def test_eos_param_groups_that_diverge_during_training_drop_the_threshold_with_a_warning():
    class Diverging(Regression):
        def configure_optimizers(self):
            groups = [{"params": self.net[0].parameters()}, {"params": self.net[-1].parameters()}]
            optimizer = torch.optim.SGD(groups, lr=self.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda t: 1.0, lambda t: 0.5**t])
            return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    monitor = EdgeOfStabilityMonitor(every_n_steps=2, probe_size=16)
    with pytest.warns(UserWarning, match="no threshold at step 2.*param_group"):
        trainer = fit(Diverging(), [monitor], steps=2)
    assert trainer.global_step == 2
    assert set(monitor.last_metrics) == {"eos/sharpness", "eos/sharpness_err", "eos/num_hvp", "eos/seconds"}
