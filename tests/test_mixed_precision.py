"""Under 16-mixed, bf16-mixed and bf16-true training the curvature monitors compute in fp32 (autocast off,
half-precision weights upcast), so their values match the fp64 dense Hessian of the same weights; every monitor
runs under each of them, the NTK also in fp32."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from test_callbacks_curvature import Regression, dense_eigenvalues
from test_zoo import all_monitors
from torch.utils.data import DataLoader, TensorDataset
from zoo import ZooModule, unpack, zoo_loader

from hildtools.callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor
from hildtools.metrics import empirical_ntk


@pytest.mark.parametrize(
    "precision, accelerator",
    [
        ("bf16-mixed", "cpu"),
        ("bf16-true", "cpu"),  # fp16 AMP does not exist on CPU (Lightning swaps in bf16)
        pytest.param("16-mixed", "gpu", marks=pytest.mark.gpu),
        pytest.param("bf16-mixed", "gpu", marks=pytest.mark.gpu),
    ],
)
def test_curvature_monitors_compute_in_fp32(precision, accelerator):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g) * 50, torch.randint(0, 3, (64,), generator=g))
    module = Regression(bn=True)
    monitors = [
        HessianEigenMonitor(k=2, every_n_steps=4, probe_size=32, tol=1e-6),
        EdgeOfStabilityMonitor(every_n_steps=4, probe_size=32, tol=1e-6),
    ]
    trainer = pl.Trainer(
        max_steps=8,
        precision=precision,
        accelerator=accelerator,
        devices=1,
        callbacks=list(monitors),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=16))
    probe = [t.cpu() for t in monitors[0].probe.batch]
    exact = dense_eigenvalues(module.cpu().float(), probe, bn_train=True)
    assert monitors[0].last_metrics["hessian/eig_0"] == pytest.approx(float(exact[0]), rel=1e-4)
    assert monitors[0].last_metrics["hessian/eig_1"] == pytest.approx(float(exact[1]), rel=1e-4)
    assert monitors[1].last_metrics["eos/sharpness"] == pytest.approx(float(exact[0]), rel=1e-4)


def precision_args(precision):
    """Trainer arguments; fp16 AMP on CPU through Lightning's plugin with a CPU GradScaler."""
    if precision == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-mixed"])
def test_every_monitor_runs_under_half_precision_and_the_ntk_is_computed_in_fp32(precision):
    """All six monitors log finite values (a bf16-true model gets bf16 probe inputs for its forward, as in
    training); the NTK of the final weights equals the fp64 kernel of the same weights to fp32 accuracy, not bf16's."""
    monitors = all_monitors(every=4, probe=16)
    torch.manual_seed(0)
    module = ZooModule("bn_cnn")
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        callbacks=monitors,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **precision_args(precision),
    )
    trainer.fit(module, zoo_loader("bn_cnn"))
    for monitor in monitors:
        assert monitor.last_metrics and all(math.isfinite(v) for v in monitor.last_metrics.values()), monitor
    inputs = unpack(monitors[2].probe.batch)[0]
    exact = empirical_ntk(module.double().eval(), inputs.double())
    assert monitors[2].last_metrics["ntk/trace"] == pytest.approx(exact.trace().item(), rel=1e-4)
