"""Every monitor on the real architectures of the zoo (ResNet-18, GPT-2, BERT, Llama, ViT at tiny sizes, random
weights) under a Lightning Trainer: each logs finite values (none needs to refuse: the issue allows a refusal in
setup with a reason, and a monitor that starts refusing here is a regression); with the monitors attached, GPT-2 and
BERT train bitwise the same as without them.
"""

import math

import lightning.pytorch as pl
import pytest
import torch
from test_zoo import OPTIMIZERS
from zoo import REAL_ZOO, num_classes, zoo_loader, zoo_module

from hildtools.callbacks import (
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
    InvariantSetMonitor,
    NeuralCollapseMonitor,
    NTKAlignmentMonitor,
)
from hildtools.optimizers import Lion, Signum

pytest.importorskip("transformers")

MONITORS = ("hessian", "eos", "ntk", "nc", "rank", "invariant")


def make_monitor(kind, name, every=2, probe=8):
    shared = {"every_n_steps": every, "probe_size": probe, "measure_at_start": True}
    if kind == "hessian":
        return HessianEigenMonitor(k=2, max_iter=10, **shared)
    if kind == "eos":
        return EdgeOfStabilityMonitor(max_iter=10, **shared)
    if kind == "ntk":
        return NTKAlignmentMonitor(**shared)
    if kind == "nc":
        return NeuralCollapseMonitor(num_classes=num_classes(name), **shared)
    if kind == "rank":
        return FeatureRankMonitor(**shared)
    return InvariantSetMonitor(every_n_steps=every, measure_at_start=True)


def trainer(callbacks, steps):
    return pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True)  # fmt: skip


def fit(name, callbacks, steps):
    torch.manual_seed(0)
    module = zoo_module(name)
    trainer(callbacks, steps).fit(module, zoo_loader(name, n=32, batch_size=8))
    return module


@pytest.mark.slow
@pytest.mark.parametrize("kind", MONITORS)
@pytest.mark.parametrize("name", REAL_ZOO)
def test_every_monitor_logs_on_every_architecture(name, kind):
    """Two steps, measured at the start and after step 2: finite values of the monitor's quantities (its cost,
    ``*/seconds``, alone does not count)."""
    monitor = make_monitor(kind, name)
    fit(name, [monitor], steps=2)
    assert monitor.last_step == 2
    quantities = [key for key in monitor.last_metrics if not key.endswith("/seconds")]
    assert quantities, f"{type(monitor).__name__} logged nothing on {name}"
    assert all(math.isfinite(value) for value in monitor.last_metrics.values()), monitor.last_metrics


def test_the_zoo_architectures_are_what_they_claim():
    """Guards against a zoo that quietly lost what makes it a test: GPT-2's Conv1D, BERT's padding masks, Llama's
    RMSNorm and gated MLP, ViT's patches, ResNet-18's 8 basic blocks with BatchNorm."""
    kinds = {name: {type(m).__name__ for m in zoo_module(name).modules()} for name in REAL_ZOO}
    assert "Conv1D" in kinds["gpt2"] and "LlamaRMSNorm" in kinds["llama"] and "LlamaMLP" in kinds["llama"]
    assert "ViTPatchEmbeddings" in kinds["vit"] and "BertForSequenceClassification" in kinds["bert"]
    assert sum(type(m).__name__ == "BasicBlock" for m in zoo_module("resnet18").modules()) == 8
    bert_batch = next(iter(zoo_loader("bert")))
    assert set(bert_batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert (bert_batch["attention_mask"] == 0).any()


@pytest.fixture(scope="module")
def plain_weights():
    """Weights after training without monitors, once per model."""
    return {name: fit(name, [], steps=12).state_dict() for name in ("gpt2", "bert")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", (*MONITORS, "all"))
@pytest.mark.parametrize("name", ("gpt2", "bert"))
def test_monitors_leave_transformer_training_bitwise_identical(plain_weights, name, kind):
    """12 steps of SGD with momentum and dropout on; every monitor measures (at the start and every 4 steps) and the
    weights are bitwise those of the run without monitors."""
    kinds = MONITORS if kind == "all" else (kind,)
    monitors = [make_monitor(k, name, every=4) for k in kinds]
    probed = fit(name, monitors, steps=12)
    for (key, a), b in zip(plain_weights[name].items(), probed.state_dict().values()):
        assert torch.equal(a, b), key
    for monitor in monitors:
        assert monitor.last_step == 12 and monitor.last_metrics, type(monitor).__name__


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


# test_zoo's optimizers, with the sign methods at the lr the Lion paper advises for transformers (3-10x below
# AdamW's): at test_zoo's 1e-2 they diverge on BERT; and Adam.
OPTIMIZERS_WITH_ADAM = {
    **OPTIMIZERS,
    "lion": lambda p: Lion(p, lr=1e-3, weight_decay=0.1),
    "signum": lambda p: Signum(p, lr=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS_WITH_ADAM))
@pytest.mark.parametrize("name", REAL_ZOO)
def test_every_optimizer_trains_every_architecture(name, optimizer):
    """Over 40 steps (test_zoo's hyper-parameters, sign methods at lr 1e-3) the mean training loss of the last 8
    steps is at least 10% below that of the first 8: every architecture learns its task with every optimizer."""
    recorder = LossRecorder()
    torch.manual_seed(0)
    module = zoo_module(name, make_optimizer=OPTIMIZERS_WITH_ADAM[optimizer])
    trainer([recorder], steps=40).fit(module, zoo_loader(name, n=64, batch_size=16))
    first, last = sum(recorder.losses[:8]) / 8, sum(recorder.losses[-8:]) / 8
    assert all(math.isfinite(loss) for loss in recorder.losses) and last < 0.9 * first, (first, last)
