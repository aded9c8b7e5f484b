"""The probing mechanism leaves training exactly as it was, in every grad mode Lightning runs hooks under."""

import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import make_data, zoo_module

from hildtools.batches import default_unpack
from hildtools.callbacks import FeatureRankMonitor
from hildtools.callbacks._monitor import Monitor, SkipMeasurement
from hildtools.probe import Probe, draw_examples, training_step_loss


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))


def snapshot(model, optimizer):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "opt": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "autocast": torch.is_autocast_enabled("cpu"),
    }


def assert_same(a, b):
    for key in a:
        if key in ("params", "grads", "buffers"):
            for x, y in zip(a[key], b[key]):
                assert (x is None and y is None) or torch.equal(x, y), key
        elif key == "opt":
            for (ka, va), (kb, vb) in zip(a[key]["state"].items(), b[key]["state"].items()):
                assert ka == kb and all(torch.equal(va[n], vb[n]) for n in va)
        elif key == "rng":
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def hvp_norm(probe, model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = probe.loss(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]  # draws from the global RNG on purpose: must be restored
    hv = torch.autograd.grad(grads, params, grad_outputs=v)
    return sum(h.pow(2).sum() for h in hv).sqrt()


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_session_leaves_no_trace(bn_mode, context):
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for _ in range(2):
        optimizer.zero_grad()
        ce_loss(model, (x, y)).backward()
        optimizer.step()
    model[3].eval()  # a submodule in eval on purpose: per-module modes must survive
    probe = Probe((torch.randn(16, 5), torch.randint(0, 3, (16,))), loss_fn=ce_loss, bn_mode=bn_mode)
    contexts = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with contexts[context]():
        before = snapshot(model, optimizer)
        batch = probe.prepare(None, model)
        with probe.session(model) as module:
            value = hvp_norm(probe, module, probe.prepare_batch(batch))
        after = snapshot(model, optimizer)
    assert torch.isfinite(value) and value > 0
    assert_same(before, after)


def test_bn_mode_changes_the_probed_loss():
    model = bn_net()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    losses = {}
    for mode in ("eval", "train"):
        probe = Probe(batch, loss_fn=ce_loss, bn_mode=mode)
        with probe.session(model) as module:
            losses[mode] = probe.loss(module, batch).item()
            assert not module[3].training  # dropout always off
            assert module[1].training == (mode == "train")
    assert losses["eval"] != pytest.approx(losses["train"])


def test_draw_examples_keeps_global_and_loader_rng():
    data = TensorDataset(torch.arange(100.0).unsqueeze(1), torch.arange(100))
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=generator)
    rng, gen_state = torch.get_rng_state(), generator.get_state()
    probe = draw_examples(loader, 20)
    assert probe[0].shape == (20, 1) and probe[1].shape == (20,)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(generator.get_state(), gen_state)
    assert torch.equal(probe[0][:8, 0].long(), probe[1][:8])


def test_training_step_loss_silences_logging():
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train_loss", loss)  # would raise outside a Trainer
            return {"loss": loss}

    module = Module()
    loss = training_step_loss(module, (torch.ones(4, 3),))
    assert loss.shape == () and "log" not in vars(module)
    assert torch.allclose(loss, module.layer(torch.ones(4, 3)).pow(2).mean())


def test_default_unpack_formats():
    x, y = torch.ones(2, 3), torch.zeros(2)
    assert default_unpack((x, y))[1] is y
    assert default_unpack({"input": x, "labels": y})[0] is x  # a lone x/input/inputs entry goes positionally
    assert default_unpack(x) == (x, None)
    mask, types = torch.ones(2, 3), torch.zeros(2, 3)
    inputs, targets = default_unpack({"input_ids": x, "attention_mask": mask, "token_type_ids": types, "labels": y})
    assert targets is y and list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert inputs["input_ids"] is x and inputs["attention_mask"] is mask and inputs["token_type_ids"] is types
    inputs, targets = default_unpack({"pixel_values": x, "position_ids": mask})
    assert targets is None and list(inputs) == ["pixel_values", "position_ids"]
    for key in ("label", "y", "target", "targets"):
        assert list(default_unpack({"x": x, "mask": mask, key: y})[0]) == ["x", "mask"]  # every target key left out
    with pytest.raises(ValueError, match="unpack"):
        default_unpack({"labels": y})


def test_math_layers_import_neither_the_probe_nor_lightning():
    """curvature/ and metrics/ take batch utilities from hildtools.batches, so plain PyTorch loops use them alone."""
    code = (
        "import sys, hildtools.curvature, hildtools.metrics, hildtools.optimizers; "
        "print(sorted(m for m in sys.modules if m in ('hildtools.probe', 'hildtools.callbacks', 'lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_dict_batches_reach_the_model_whole_on_padded_bert():
    """A padded BERT batch: the probed loss is the training loss of the same batch, and the features the feature
    monitors probe are the ones training computes (attention_mask and token_type_ids included, labels left out)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    module = zoo_module("bert", dropout=0.0)  # dropout off: training and probing compute the same function
    batch = next(iter(DataLoader(make_data("bert", 16), batch_size=16)))
    assert (batch["attention_mask"] == 0).any() and (batch["attention_mask"] == 1).all(dim=1).any()  # padded
    seen = []
    handle = module.net.classifier.register_forward_hook(lambda layer, args, out: seen.append(args[0].detach()))
    training_loss = module.net(**batch).loss  # what the module's training_step returns, in train mode
    module.net(**{k: v for k, v in batch.items() if k != "attention_mask"})
    handle.remove()
    assert not torch.allclose(seen[0], seen[1], rtol=1e-3, atol=1e-4)  # dropping the mask changes the features

    monitor = FeatureRankMonitor(probe_data=batch, layers="net.classifier", every_n_steps=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    probe_batch = monitor.probe.prepare(trainer, module)
    with monitor.probe.session(module) as probed:
        loss = monitor.probe.loss(probed, monitor.probe.prepare_batch())
        capture, targets, logits = monitor.probe_features(trainer, probed, probe_batch)
    assert torch.allclose(loss, training_loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(capture.features["net.classifier"], seen[0], rtol=1e-5, atol=1e-6)
    assert targets is probe_batch["labels"]
    assert torch.allclose(
        logits, module.net(**{k: v for k, v in batch.items() if k != "labels"}).logits, rtol=1e-5, atol=1e-6
    )


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="probe_size"):
        Probe(probe_size=0)
    with pytest.raises(ValueError, match="bn_mode"):
        Probe(bn_mode="frozen")
    with pytest.raises(TypeError, match="loss_fn"):
        Probe(loss_fn=3)
    with pytest.raises(ValueError, match="every_n_steps"):
        Monitor(every_n_steps=0)
    with pytest.raises(ValueError, match="exactly one"):
        Monitor(every_n_steps=2, every_n_epochs=1)
    with pytest.raises(ValueError, match="exactly one"):
        Monitor()


# ---------------------------------------------------------------------------------------------------------------
class DigitsLike(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = bn_net()

    def training_step(self, batch, batch_idx):
        loss = ce_loss(self.net, batch)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class GradNormMonitor(Monitor):
    """A minimal monitor: one Hessian-vector product on the probe (draws from the global RNG on purpose)."""

    namespace = "test"

    def measure(self, trainer, pl_module, module, batch):
        if self.nan:
            raise SkipMeasurement("non-finite probe loss")
        return {"hvp_norm": hvp_norm(self.probe, module, batch)}

    nan = False


def fit(callbacks, steps=12, **trainer_kwargs):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 5), torch.randint(0, 3, (96,)))
    loader = DataLoader(data, batch_size=16, shuffle=True)
    model = DigitsLike()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, loader)
    return model


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_monitor_leaves_training_bitwise_identical(bn_mode):
    plain = fit([])
    monitor = GradNormMonitor(every_n_steps=3, probe_size=40, bn_mode=bn_mode)
    probed = fit([monitor])
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(a, b)
    assert monitor.last_step == 12 and monitor.last_metrics["test/hvp_norm"] > 0
    assert monitor.probe.batch[0].shape == (40, 5)


def test_monitor_skips_with_a_warning_and_training_goes_on():
    monitor = GradNormMonitor(every_n_steps=4, probe_size=16, measure_at_start=False)
    monitor.nan = True
    with pytest.warns(UserWarning, match="skipped"):
        fit([monitor], steps=4)
    assert monitor.last_metrics == {}


def test_monitor_state_round_trips_with_weights_only(tmp_path):
    monitor = GradNormMonitor(every_n_steps=3, probe_size=24)
    fit([monitor], steps=6)
    path = tmp_path / "state.pt"
    torch.save(monitor.state_dict(), path)
    restored = GradNormMonitor(every_n_steps=3, probe_size=24)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.last_step == 6
    assert all(torch.equal(a, b.cpu()) for a, b in zip(restored.probe.batch, monitor.probe.batch))


def test_non_finite_values_are_dropped_and_the_rest_logged():
    class InfMonitor(GradNormMonitor):
        def measure(self, trainer, pl_module, module, batch):
            return {"finite": 1.0, "infinite": float("inf"), "nan": float("nan")}

    monitor = InfMonitor(every_n_steps=4, probe_size=16, measure_at_start=False)
    with pytest.warns(UserWarning, match=r"non-finite.*test/infinite.*test/nan"):
        fit([monitor], steps=4)
    assert monitor.last_metrics.keys() == {"test/finite", "test/seconds"} and monitor.last_metrics["test/finite"] == 1.0
