"""Monitors under FSDP (2 CPU processes, gloo): Lightning's FSDPStrategy (FSDP1) and ModelParallelStrategy with
``fully_shard`` (FSDP2). The forward-only and weight-only monitors (neural collapse, feature rank, invariant sets)
run and equal the functional API on the whole model and the union of the ranks' probe data (as under DDP, tested
alongside), with unequal probe shards and without changing training; the monitors that differentiate through the
model (NTK; Hessian and edge of stability with hvp="autograd"), and SAM and NGN, refuse clearly; Lion and Signum
train as under DDP. The Hessian monitors under FSDP (finite differences) are tested in test_fsdp_curvature.py."""

import functools
import re

import lightning.pytorch as pl
import pytest
import torch
from ddp_utils import run_ranks
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import (
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
    InvariantSetMonitor,
    NeuralCollapseMonitor,
    NTKAlignmentMonitor,
)
from hildtools.metrics import FeatureCapture, feature_rank, invariant_sets, neural_collapse
from hildtools.optimizers import NGN, SAM, Lion, Signum
from hildtools.optimizers.sam import check_lightning_compat
from hildtools.sharding import UnwrappingTracer, clean_name, full_parameters, modules_by_name

NUM_CLASSES = 3


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy made to run on CPU for these tests: Lightning refuses ``accelerator="cpu"`` for
    the exact class, and FSDP1 on CPU needs ``device_id=cpu`` (Lightning passes ``None`` there)."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, device_id=torch.device("cpu"), **self.kwargs)


class Net(pl.LightningModule):
    """An MLP with two identical neurons planted in ``net.0`` (an invariant set SGD keeps) and a parameter of the
    root module (``scale``), which FSDP shards with the root."""

    def __init__(self, sharding=None, optimizer=torch.optim.SGD):
        super().__init__()
        torch.manual_seed(0)
        self.sharding, self.optimizer = sharding, optimizer
        self.net = nn.Sequential(
            nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, NUM_CLASSES)
        )  # fmt: skip
        self.scale = nn.Parameter(torch.ones(NUM_CLASSES))
        with torch.no_grad():
            self.net[0].weight[1], self.net[0].bias[1] = self.net[0].weight[0], self.net[0].bias[0]
            self.net[2].weight[:, 1] = self.net[2].weight[:, 0]

    def configure_model(self):
        if self.sharding == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.net(x) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=0.1 if self.optimizer is torch.optim.SGD else 1e-3)


def make_strategy(sharding, world_size):
    if sharding == "ddp":
        return "ddp"
    if sharding.startswith("fsdp") and sharding != "fsdp2":  # "fsdp_flat": FSDP1's flat parameters
        return CPUFSDPStrategy(auto_wrap_policy={nn.Linear}, use_orig_params=sharding == "fsdp")
    return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1)


def global_probe(n=40):
    generator = torch.Generator().manual_seed(7)
    labels = torch.arange(n) % NUM_CLASSES
    return torch.randn(n, 5, generator=generator) + labels[:, None], labels


class FullWeights(pl.Callback):
    """Keeps the whole parameters (clean names) at the end of training: gathered on every rank."""

    def on_train_end(self, trainer, pl_module):
        with full_parameters(trainer, pl_module):
            self.state = {clean_name(k): v.detach().clone() for k, v in pl_module.named_parameters()}


def train(strategy, world_size, module, callbacks, max_steps):
    """Fit ``module`` on a fixed synthetic train set (the same on every call, so runs can be compared)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (32,), generator=generator)
    data = TensorDataset(torch.randn(32, 5, generator=generator), labels)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=world_size, max_steps=max_steps, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))


def fit_on_rank(rank, world_size, sharding, sizes=None, with_monitors=True):
    """``sizes``: each rank's part of the global probe set; ``None``: probe sets drawn from the train loader."""
    probe = {"probe_size": 12, "batch_size": 8}
    if sizes is not None:
        x, y = global_probe()
        start = sum(sizes[:rank])
        probe["probe_data"] = (x[start : start + sizes[rank]], y[start : start + sizes[rank]])
    monitors = [
        NeuralCollapseMonitor(NUM_CLASSES, every_n_steps=3, **probe),
        FeatureRankMonitor(layers="net.2", capture="output", every_n_steps=3, **probe),
        InvariantSetMonitor(every_n_steps=3),
    ] if with_monitors else []  # fmt: skip
    full = FullWeights()
    train(make_strategy(sharding, world_size), world_size, Net(sharding), [*monitors, full], max_steps=3)
    return {"state": full.state, "metrics": [dict(m.last_metrics) for m in monitors]}


def reference(state):
    """The monitors' values from the functional API, on one process, the whole model and the global probe set."""
    model = Net()
    model.load_state_dict(state)
    model.eval()
    x, y = global_probe()
    with FeatureCapture(model) as penultimate, FeatureCapture(model, "net.2", "output") as hidden, torch.no_grad():
        outputs = model(x)
    collapse = neural_collapse(penultimate.features["net.4"], y, NUM_CLASSES, model.net[4].weight, outputs)
    rank = feature_rank(hidden.features["net.2"])
    layer = invariant_sets(model).layers["net.0"]
    return collapse, rank, layer


@pytest.mark.parametrize("sizes", [(20, 20), (28, 12)], ids=["equal", "unequal"])
@pytest.mark.parametrize("sharding", ["fsdp", "fsdp_flat", "fsdp2", "ddp"])
def test_forward_and_weight_monitors_equal_the_whole_model(sharding, sizes):
    first, second = run_ranks(fit_on_rank, sharding, sizes, timeout=180)
    assert first["metrics"] == second["metrics"]  # every rank holds the same values
    collapse, rank, layer = reference(first["state"])
    nc, rank_metrics, sets = first["metrics"]
    for key in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "cdnv"):
        assert nc[f"nc/net.4/{key}"] == pytest.approx(float(collapse[key]), rel=1e-5, abs=1e-8), key
    for key in ("pca_rank", "effective_rank", "stable_rank"):
        assert rank_metrics[f"rank/net.2/{key}"] == pytest.approx(float(rank[key]), rel=1e-5), key
    assert sets["collapse/net.0/num_identical_groups"] == layer.num_identical_groups == 1  # the planted pair
    assert sets["collapse/net.0/independent_fraction"] == pytest.approx(layer.independent_fraction)
    assert "collapse/net.2/independent_fraction" in sets  # names as in the unwrapped model


def fit_twice(rank, world_size, sharding):
    runs = [fit_on_rank(rank, world_size, sharding, with_monitors=with_monitors) for with_monitors in (False, True)]
    return runs[0]["state"], runs[1]["state"], runs[1]["metrics"]


@pytest.mark.parametrize("sharding", ["fsdp", "fsdp2"])
def test_monitors_leave_fsdp_training_bitwise_unchanged(sharding):
    """Probe sets drawn from the train loader by each rank; the runs with and without monitors are equal."""
    for without, with_monitors, metrics in run_ranks(fit_twice, sharding, timeout=180):
        assert all(metrics)
        assert without.keys() == with_monitors.keys()
        for key, value in without.items():
            assert torch.equal(value, with_monitors[key]), key


def train_with(rank, world_size, optimizer):
    states = []
    for sharding in ("ddp", "fsdp", "fsdp2"):
        full = FullWeights()
        module = Net(None if sharding == "ddp" else sharding, optimizer)
        train(make_strategy(sharding, world_size), world_size, module, [full], max_steps=4)
        states.append(full.state)
    return states


@pytest.mark.parametrize("optimizer", [Lion, Signum])
def test_elementwise_optimizers_train_the_same_under_fsdp_as_under_ddp(optimizer):
    for ddp, *sharded in run_ranks(train_with, optimizer, timeout=180):
        for state in sharded:
            for key, value in ddp.items():
                torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)


class SAMNet(Net):
    def on_fit_start(self):
        check_lightning_compat(self.trainer)


def refused_on_rank(rank, world_size, sharding, name, tensor_parallel):
    callbacks, module = [], Net(None if tensor_parallel else sharding)
    if name == "sam":
        module = SAMNet(sharding, functools.partial(SAM, base_optimizer=torch.optim.SGD))
    elif name == "ngn":
        module = Net(sharding, NGN)
    else:
        callbacks = [{
            "hessian": lambda: HessianEigenMonitor(k=1, every_n_steps=2, hvp="autograd"),
            "eos": lambda: EdgeOfStabilityMonitor(every_n_steps=2, hvp="autograd"),
            "trace": lambda: HessianEigenMonitor(k=1, every_n_steps=2, trace=True),
            "ntk": lambda: NTKAlignmentMonitor(every_n_steps=2),
            "rank": lambda: FeatureRankMonitor(every_n_steps=2),
        }[name]()]  # fmt: skip
    strategy = (
        ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world_size)
        if tensor_parallel else make_strategy(sharding, world_size)
    )  # fmt: skip
    try:
        train(strategy, world_size, module, callbacks, max_steps=1)
    except (RuntimeError, ValueError) as error:
        return str(error)
    return None


@pytest.mark.parametrize(
    "sharding, name, tensor_parallel, message",
    [
        (
            "fsdp",
            "hessian",
            False,
            "HessianEigenMonitor\\(hvp='autograd'\\) does not support CPUFSDPStrategy.*double backward",
        ),
        ("fsdp2", "eos", False, "EdgeOfStabilityMonitor\\(hvp='autograd'\\) does not support ModelParallelStrategy"),
        ("fsdp2", "trace", False, "HessianEigenMonitor\\(trace=True\\) does not support ModelParallelStrategy"),
        ("fsdp", "ntk", False, "NTKAlignmentMonitor does not support.*FeatureRankMonitor.*method='sketch'"),
        ("fsdp2", "rank", True, "tensor parallelism.*tensor_parallel_size=1"),
        ("fsdp", "sam", False, "SAM does not support CPUFSDPStrategy.*shard's norm"),
        ("fsdp2", "sam", False, "SAM does not support FSDP-sharded parameters \\(DTensor\\)"),
        ("fsdp_flat", "ngn", False, "NGN does not support FSDP-sharded parameters \\(FlatParameter\\)"),
        ("fsdp2", "ngn", False, "NGN does not support FSDP-sharded parameters \\(DTensor\\)"),
    ],
)
def test_what_cannot_run_under_fsdp_refuses_clearly(sharding, name, tensor_parallel, message):
    for error in run_ranks(refused_on_rank, sharding, name, tensor_parallel, timeout=120):
        assert error is not None and re.search(message, error), error


def test_names_and_tracing_of_an_unsharded_model_are_unchanged():
    model = Net()
    assert clean_name("net.0._fsdp_wrapped_module.weight") == "net.0.weight" == clean_name("net.0.weight")
    assert modules_by_name(model) == dict(model.named_modules())
    traced = [(node.op, node.target) for node in UnwrappingTracer().trace(model).nodes]
    assert traced == [(node.op, node.target) for node in torch.fx.symbolic_trace(model).graph.nodes]
