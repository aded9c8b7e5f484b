"""Under 16-mixed, bf16-mixed and bf16-true training the curvature monitors compute in fp32 (autocast off,
half-precision weights upcast), so their values match the fp64 dense Hessian of the same weights."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor
from test_callbacks_curvature import Regression, dense_eigenvalues


@pytest.mark.parametrize(
    "precision, accelerator",
    [("bf16-mixed", "cpu"), ("bf16-true", "cpu"),  # fp16 AMP does not exist on CPU (Lightning swaps in bf16)
     pytest.param("16-mixed", "gpu", marks=pytest.mark.gpu), pytest.param("bf16-mixed", "gpu", marks=pytest.mark.gpu)],
)
def test_curvature_monitors_compute_in_fp32(precision, accelerator):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g) * 50, torch.randint(0, 3, (64,), generator=g))
    module = Regression(bn=True)
    monitors = [HessianEigenMonitor(k=2, every_n_steps=4, probe_size=32, tol=1e-6),
                EdgeOfStabilityMonitor(every_n_steps=4, probe_size=32, tol=1e-6)]
    trainer = pl.Trainer(max_steps=8, precision=precision, accelerator=accelerator, devices=1, callbacks=list(monitors), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=16))
    probe = [t.cpu() for t in monitors[0].probe.batch]
    exact = dense_eigenvalues(module.cpu().float(), probe, bn_train=True)
    assert monitors[0].last_metrics["hessian/eig_0"] == pytest.approx(float(exact[0]), rel=1e-4)
    assert monitors[0].last_metrics["hessian/eig_1"] == pytest.approx(float(exact[1]), rel=1e-4)
    assert monitors[1].last_metrics["eos/sharpness"] == pytest.approx(float(exact[0]), rel=1e-4)
