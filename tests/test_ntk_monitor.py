"""NTKAlignmentMonitor in short Lightning fits: no side effects, values, resume, no labels, NaN skip, bad input,
pictures (PNG and offline W&B), DDP probe sharing, CUDA."""

import csv
import glob
import os
import time
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from ddp_utils import run_ranks
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from wandb_utils import history_keys

from hildtools.callbacks import NTKAlignmentMonitor
from hildtools.metrics import (
    empirical_ntk,
    kernel_alignment,
    kernel_alignment_between,
    kernel_effective_rank,
    relative_change,
)

KEYS = {
    "trace",
    "effective_rank",
    "init_alignment",
    "relative_change",
    "target_alignment",
    "target_alignment_centered",
    "seconds",
}


class Classifier(pl.LightningModule):
    def __init__(self, nan_in_eval=False, dropout=0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(dropout), nn.Linear(12, 3))
        self.nan_in_eval = nan_in_eval

    def forward(self, x):
        out = self.net(x)
        return out * float("nan") if self.nan_in_eval and not self.training else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def dataset(n=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(n // 3)
    return TensorDataset(torch.randn(n, 5, generator=generator) + labels[:, None], labels)


def fit(callbacks, tmp_path, max_epochs=2, logger=False, ckpt_path=None, nan_in_eval=False, extra=(), resumable=False):
    """``resumable``: no dropout and no shuffling, so that a resumed fit equals an uninterrupted one."""
    torch.manual_seed(0)
    model = Classifier(nan_in_eval, dropout=0.0 if resumable else 0.2)
    loader = DataLoader(dataset(), batch_size=12, shuffle=not resumable, generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[*callbacks, *extra],
        enable_checkpointing=bool(extra), enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, trainer


def test_training_is_bitwise_untouched_and_metrics_are_logged(tmp_path):
    plain, _ = fit([], tmp_path)
    monitor = NTKAlignmentMonitor(every_n_steps=2, probe_size=20, figures=True)
    monitored, trainer = fit([monitor], tmp_path, logger=CSVLogger(tmp_path))
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), name
    assert {key.split("/")[1] for key in monitor.last_metrics} == KEYS
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as file:
        rows = list(csv.DictReader(file))
    logged = [row for row in rows if row.get("ntk/trace")]
    assert len(logged) == 5  # steps 0, 2, 4, 6, 8
    assert float(logged[0]["ntk/init_alignment"]) == pytest.approx(1) and float(logged[0]["ntk/relative_change"]) == 0
    pictures = glob.glob(os.path.join(trainer.log_dir, "figures", "ntk_spectrum_*.png"))
    assert len(pictures) == 5


def test_logged_values_equal_the_functional_api(tmp_path):
    probe = dataset(seed=3).tensors
    probe = (probe[0][:15], probe[1][:15])
    monitor = NTKAlignmentMonitor(every_n_steps=4, probe_data=probe, output="full", chunk_size=7)
    initial = {}

    class KeepInitial(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.eval()
            initial["K"] = empirical_ntk(pl_module, probe[0], output="full")
            pl_module.train()

    model, _ = fit([KeepInitial(), monitor], tmp_path)  # 8 steps: the last measurement sees the final weights
    model.eval()
    kernel = empirical_ntk(model, probe[0], output="full")
    expected = {
        "trace": kernel.trace(),
        "effective_rank": kernel_effective_rank(kernel),
        "init_alignment": kernel_alignment_between(kernel, initial["K"]),
        "relative_change": relative_change(kernel, initial["K"]),
        "target_alignment": kernel_alignment(kernel, probe[1]),
        "target_alignment_centered": kernel_alignment(kernel, probe[1], centered=True),
    }
    for key, value in expected.items():
        assert monitor.last_metrics[f"ntk/{key}"] == pytest.approx(value.item(), rel=1e-5), key
    torch.testing.assert_close(monitor.initial_kernel, initial["K"], rtol=1e-5, atol=1e-6)


def test_resume_keeps_k0_and_continues_the_same_curves(tmp_path):
    uninterrupted = NTKAlignmentMonitor(every_n_steps=2, probe_size=20)
    model, _ = fit([uninterrupted], tmp_path, max_epochs=4, resumable=True)

    first = NTKAlignmentMonitor(every_n_steps=2, probe_size=20)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit([first], tmp_path, max_epochs=2, extra=[checkpoint], resumable=True)
    saved = torch.load(checkpoint.last_model_path, weights_only=True)  # tensors and primitives only
    state = next(value for key, value in saved["callbacks"].items() if key.startswith("NTKAlignmentMonitor"))
    torch.testing.assert_close(state["initial_kernel"], first.initial_kernel.cpu(), rtol=0, atol=0)

    resumed = NTKAlignmentMonitor(every_n_steps=2, probe_size=20)
    resumed_model, _ = fit(
        [resumed],
        tmp_path,
        max_epochs=4,
        ckpt_path=checkpoint.last_model_path,
        extra=[ModelCheckpoint(dirpath=tmp_path / "ckpt")],
        resumable=True,
    )
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(resumed.initial_kernel, uninterrupted.initial_kernel, rtol=0, atol=0)
    for key, value in uninterrupted.last_metrics.items():
        if key == "ntk/seconds":  # wall time, not a measured value
            continue
        assert resumed.last_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    round_trip = NTKAlignmentMonitor(every_n_steps=2)
    round_trip.load_state_dict(first.state_dict())
    assert torch.equal(round_trip.initial_kernel, first.initial_kernel.cpu())


def test_probe_without_labels_logs_kernel_metrics_and_warns_once(tmp_path):
    inputs = dataset(seed=4).tensors[0][:16]
    monitor = NTKAlignmentMonitor(every_n_steps=2, probe_data=inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([monitor], tmp_path)
    messages = [str(w.message) for w in caught if "NTKAlignmentMonitor" in str(w.message)]
    assert len(messages) == 1 and "no targets" in messages[0]
    assert {key.split("/")[1] for key in monitor.last_metrics} == KEYS - {
        "target_alignment",
        "target_alignment_centered",
    }


def test_nan_kernel_skips_with_a_warning_and_training_goes_on(tmp_path):
    monitor = NTKAlignmentMonitor(every_n_steps=2, probe_size=12)
    with pytest.warns(UserWarning, match="skipped: the NTK contains NaN/inf"):
        model, trainer = fit([monitor], tmp_path, nan_in_eval=True)
    assert trainer.global_step == 8 and monitor.last_metrics == {} and monitor.initial_kernel is None
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"output": "trace"}, ValueError, "output must be one of"),
        ({"output": "index"}, ValueError, "output_index must be an integer"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1"),
        ({"method": "sketch", "sketch_dim": -1}, ValueError, "sketch_dim must be an integer >= 1"),
        ({"sketch_dim": 8}, ValueError, "sketch_dim is only used with method='sketch'"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be None or an integer >= 1"),
        ({"probe_size": 0}, ValueError, "probe_size must be an integer >= 1"),
        ({"figures": "yes"}, ValueError, "figures must be None"),
        ({"params": "net.0.weight"}, ValueError, "params must be None or a sequence of parameter names"),
        ({"bn_mode": "batch"}, ValueError, "bn_mode must be one of"),
        ({"product_dtype": torch.bfloat16}, ValueError, "product_dtype must be one of"),
        ({"loss_fn": lambda model, batch: 0}, TypeError, "loss_fn is not used"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NTKAlignmentMonitor(**kwargs)


def test_unknown_parameter_names_fail_at_fit_start(tmp_path):
    with pytest.raises(ValueError, match=r"params: \['net.9.weight'\] are not parameters"):
        fit([NTKAlignmentMonitor(every_n_steps=2, params=["net.9.weight"])], tmp_path)


def test_parameter_subset_and_train_mode_batchnorm(tmp_path):
    probe = dataset(seed=5).tensors
    monitor = NTKAlignmentMonitor(every_n_steps=8, probe_data=probe, params=["net.4.weight"], bn_mode="train")
    model, _ = fit([monitor], tmp_path)
    model.train()
    model.net[3].eval()  # the probe turns dropout off and keeps BatchNorm in train mode
    kernel = empirical_ntk(model, probe[0], params=["net.4.weight"])
    assert monitor.last_metrics["ntk/trace"] == pytest.approx(kernel.trace().item(), rel=1e-5)


def test_wandb_gets_the_spectrum_picture(tmp_path):
    import wandb

    logger = pl.loggers.WandbLogger(project="hildtools-test", save_dir=str(tmp_path), mode="offline")
    try:
        fit([NTKAlignmentMonitor(every_n_steps=4, probe_size=12)], tmp_path, max_epochs=1, logger=logger)
        run_dir = os.path.dirname(logger.experiment.dir)
    finally:
        wandb.finish()
    expected = {f"ntk/{key}" for key in KEYS} | {"ntk/spectrum/_type"}
    deadline = time.monotonic() + 30  # the offline run file can be completed by W&B's service after finish()
    while not expected <= history_keys(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert expected <= history_keys(run_dir)


def measure_on_rank(rank, world_size):
    torch.manual_seed(0)
    model = Classifier().eval()
    x, y = dataset(seed=10 + rank).tensors  # different probes per rank: rank 0's is broadcast
    monitor = NTKAlignmentMonitor(every_n_steps=1, probe_data=(x[:9], y[:9]), chunk_size=2)
    monitor.probe.prepare(None, model)
    monitor.on_fit_setup(None, model)
    trainer = types.SimpleNamespace(global_step=0, loggers=[], is_global_zero=rank == 0)
    return monitor.run(trainer, model)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_ranks_share_rank_zero_probe_and_agree():
    torch.manual_seed(0)
    model = Classifier().eval()
    x, y = dataset(seed=10).tensors
    kernel = empirical_ntk(model, x[:9])
    results = run_ranks(measure_on_rank, world_size=2)
    assert results[0] == results[1]
    assert results[0]["ntk/trace"] == pytest.approx(kernel.trace().item(), rel=1e-6)
    assert results[0]["ntk/target_alignment"] == pytest.approx(kernel_alignment(kernel, y[:9]).item(), rel=1e-6)


@pytest.mark.gpu
def test_cuda_fit_matches_cpu_values(tmp_path):
    probe = dataset(seed=6).tensors
    monitors = [NTKAlignmentMonitor(every_n_steps=4, probe_data=probe) for _ in range(2)]
    values = []
    for accelerator, monitor in zip(("cpu", "gpu"), monitors):
        torch.manual_seed(0)
        model = Classifier()
        trainer = pl.Trainer(max_steps=4, accelerator=accelerator, devices=1, logger=False, callbacks=[monitor],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(model, DataLoader(dataset(), batch_size=12))
        values.append(monitor.last_metrics)
    assert monitors[1].initial_kernel.device.type == "cuda"
    for key, value in values[0].items():
        if key == "ntk/seconds":  # wall time, not a measured value
            continue
        assert values[1][key] == pytest.approx(value, rel=1e-4), key
