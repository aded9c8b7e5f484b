"""Scalars reach every Lightning logger; pictures become W&B images or PNG files."""

import csv
import glob
import os

import lightning.pytorch as pl
import torch
from torch import nn
from wandb_utils import history_keys

from hildtools.logging import log_figure, log_metrics, new_figure


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Logs(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, *args):
        log_metrics(trainer, {"diag/value": torch.tensor(float(trainer.global_step)), "diag/const": 2})
        figure, axes = new_figure()
        axes.plot([0, 1], [0, trainer.global_step])
        self.path = log_figure(trainer, "diag/picture", figure)


def fit(logger, tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    callback = Logs()
    trainer = pl.Trainer(
        max_steps=2,
        logger=logger,
        callbacks=[callback],
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Tiny(), data)
    return trainer, callback


def test_csv_logger_gets_scalars_and_png_files(tmp_path):
    trainer, callback = fit(pl.loggers.CSVLogger(tmp_path), tmp_path)
    rows = list(csv.DictReader(open(os.path.join(trainer.log_dir, "metrics.csv"))))
    assert [float(r["diag/value"]) for r in rows] == [1.0, 2.0] and rows[0]["diag/const"] == "2.0"
    pngs = sorted(glob.glob(os.path.join(trainer.log_dir, "figures", "*.png")))
    assert len(pngs) == 2 and callback.path == pngs[-1]


def test_wandb_offline_run_holds_scalars_and_images(tmp_path):
    import wandb

    logger = pl.loggers.WandbLogger(project="hildtools-test", save_dir=str(tmp_path), mode="offline")
    try:
        _, callback = fit(logger, tmp_path)
        run_dir = os.path.dirname(logger.experiment.dir)
    finally:
        wandb.finish()
    keys = history_keys(run_dir)
    assert {"diag/value", "diag/const", "diag/picture/_type"} <= keys  # an image is a nested record
    assert glob.glob(os.path.join(run_dir, "files", "media", "images", "**", "*.png"), recursive=True)
    assert os.path.isfile(callback.path)  # the PNG file is kept beside the W&B image
