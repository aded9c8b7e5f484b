"""The curvature monitors under Lightning DDP (2 CPU processes, gloo): every rank holds the value a single process
gets on the union of the ranks' probe data; a NaN probe loss on one rank skips the measurement on all (no hang)."""

import lightning.pytorch as pl
import pytest
import torch
from ddp_utils import run_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor
from hildtools.curvature import hessian_eigenpairs


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def global_probe(n=40):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def ce(module, batch):
    return nn.functional.cross_entropy(module.net(batch[0]), batch[1])


def nan_on_rank1(module, batch):
    loss = ce(module, batch)
    return loss * float("nan") if torch.distributed.get_rank() == 1 else loss


def fit_on_rank(rank, world_size, loss_name, sizes):
    x, y = global_probe()
    start = sum(sizes[:rank])
    shard = (x[start : start + sizes[rank]], y[start : start + sizes[rank]])
    loss_fn = {"ce": ce, "nan": nan_on_rank1}[loss_name]
    monitors = [
        HessianEigenMonitor(k=2, every_n_steps=3, probe_data=shard, loss_fn=loss_fn, tol=1e-6),
        EdgeOfStabilityMonitor(every_n_steps=3, probe_data=shard, loss_fn=loss_fn, tol=1e-6),
    ]
    data = TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    module = Net()
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=world_size,
        max_steps=3,
        callbacks=monitors,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "metrics": [dict(m.last_metrics) for m in monitors],
    }


@pytest.mark.parametrize("sizes", [(20, 20), (28, 12)], ids=["equal", "unequal"])
def test_ddp_values_equal_single_process_on_the_union(sizes):
    results = run_ranks(fit_on_rank, "ce", sizes)
    assert results[0]["metrics"] == results[1]["metrics"]  # every rank holds the same values
    module = Net()
    module.load_state_dict(results[0]["state"])
    exact = hessian_eigenpairs(module, ce, global_probe(), k=2, tol=1e-8).eigenvalues
    hessian, eos = results[0]["metrics"]
    assert hessian["hessian/eig_0"] == pytest.approx(float(exact[0]), rel=1e-4)
    assert hessian["hessian/eig_1"] == pytest.approx(float(exact[1]), rel=1e-4)
    assert eos["eos/sharpness"] == pytest.approx(float(exact[0]), rel=1e-4)


def test_nan_on_one_rank_skips_everywhere_without_hanging():
    results = run_ranks(fit_on_rank, "nan", (20, 20), timeout=120)
    assert all(r["metrics"] == [{}, {}] for r in results)


def all_monitors_on_rank(rank, world_size, optimizer):
    from test_zoo import OPTIMIZERS, all_monitors
    from zoo import ZooModule, make_data

    torch.manual_seed(0)
    monitors = all_monitors(every=3, probe=16)
    module = ZooModule("bn_cnn", OPTIMIZERS[optimizer])
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=world_size,
        max_steps=3,
        callbacks=monitors,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(make_data("bn_cnn", 64), batch_size=8, shuffle=True))
    return {
        "params": {k: v.detach().clone() for k, v in module.named_parameters()},
        "metrics": [dict(m.last_metrics) for m in monitors],
    }


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "sam", "ngn", "lion", "signum"])
def test_all_monitors_and_optimizers_agree_across_ranks(optimizer):
    """Each rank probes its own shard (DistributedSampler); every monitor ends with the same values on every
    rank, the optimizers keep the parameter replicas identical (BatchNorm running statistics are per rank under
    DDP, as always), and nothing hangs."""
    first, second = run_ranks(all_monitors_on_rank, optimizer)
    assert all(first["metrics"]) and first["metrics"] == second["metrics"]
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key
