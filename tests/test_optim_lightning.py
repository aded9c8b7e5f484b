"""The optimizers under a Lightning Trainer (automatic optimization) and by class_path in LightningCLI."""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from hildtools.optimizers import NGN, SAM, Lion, ScaledMomentumSGD, Signum
from hildtools.optimizers.sam import check_lightning_compat


def dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 5, generator=g), torch.randn(64, 2, generator=g))


def network(batchnorm=False):
    torch.manual_seed(0)
    middle = torch.nn.BatchNorm1d(8) if batchnorm else torch.nn.Tanh()
    return torch.nn.Sequential(torch.nn.Linear(5, 8), middle, torch.nn.Linear(8, 2))


class Module(LightningModule):
    def __init__(self, batchnorm: bool = False, check: bool = False):
        super().__init__()
        self.net = network(batchnorm)
        self.check = check
        self.training_step_calls = 0

    def training_step(self, batch, batch_idx):
        self.training_step_calls += 1
        x, y = batch
        return (self.net(x) - y).square().mean()

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=16)

    def on_fit_start(self):
        if self.check:
            check_lightning_compat(self.trainer)


class SAMModule(Module):
    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)


def trainer(**kwargs):
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 8,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(**{**defaults, **kwargs})


def plain_sam_loop(steps, batchnorm=False, autocast=False):
    net = network(batchnorm)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=net if batchnorm else None)
    loader = DataLoader(dataset(), batch_size=16)
    batches = [b for _ in range(steps // len(loader) + 1) for b in loader][:steps]
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = (net(x) - y).square().mean()
            loss.backward()
            return loss

        opt.step(closure)
    return net


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_sam_under_automatic_optimization_equals_the_plain_loop(precision):
    module = SAMModule()
    trainer(precision=precision).fit(module)
    assert module.trainer.global_step == 8
    assert module.training_step_calls == 16  # two closure calls per step
    reference = plain_sam_loop(8, autocast=precision == "bf16-mixed")
    for p, q in zip(module.net.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_check_hands_sam_the_model_so_batchnorm_moves_once_per_step():
    module = SAMModule(batchnorm=True, check=True)
    trainer().fit(module)
    sam = module.trainer.optimizers[0]
    assert sam.model is module.trainer.model
    assert module.net[1].num_batches_tracked == 8
    reference = plain_sam_loop(8, batchnorm=True)
    for p, q in zip(module.net.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_check_refuses_a_grad_scaler_under_automatic_optimization():
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    with pytest.raises(ValueError, match="GradScaler"):
        trainer(plugins=[plugin]).fit(SAMModule(check=True))


def test_sam_step_without_the_closure_fails_clearly_under_a_grad_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    with pytest.raises(RuntimeError, match="16-mixed"):
        trainer(plugins=[plugin]).fit(SAMModule())


def test_check_refuses_gradient_accumulation():
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer(accumulate_grad_batches=2).fit(SAMModule(check=True))


def test_check_ignores_trainers_without_sam():
    class LionModule(Module):
        def configure_optimizers(self):
            return Lion(self.parameters(), lr=1e-3)

    trainer(accumulate_grad_batches=2, max_steps=2).fit(LionModule(check=True))


class CLIModule(LightningModule):
    """No configure_optimizers: LightningCLI builds the optimizer from --optimizer."""

    def __init__(self):
        super().__init__()
        self.net = network()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=16)


CLI_CASES = {
    "lion": (["--optimizer=hildtools.optimizers.Lion", "--optimizer.lr=0.001", "--optimizer.betas=[0.95,0.98]"],
             Lion, {"lr": 0.001, "betas": (0.95, 0.98)}),
    "signum": (["--optimizer=hildtools.optimizers.Signum", "--optimizer.lr=0.01", "--optimizer.nesterov=true"],
               Signum, {"lr": 0.01, "nesterov": True}),
    "ngn": (["--optimizer=hildtools.optimizers.NGN", "--optimizer.lr=0.5", "--optimizer.momentum=0.9"],
            NGN, {"lr": 0.5, "momentum": 0.9}),
    "scaled_sgd": (["--optimizer=hildtools.optimizers.ScaledMomentumSGD", "--optimizer.lr=0.01",
                    "--optimizer.C=0.5"], ScaledMomentumSGD, {"lr": 0.01, "C": 0.5}),
    "sam_flags": (["--optimizer=hildtools.optimizers.SAM", "--optimizer.rho=0.2",
                   "--optimizer.base_optimizer=torch.optim.AdamW", "--optimizer.base_optimizer.lr=0.01"],
                  SAM, {"rho": 0.2, "lr": 0.01}),
}  # fmt: skip

SAM_YAML = """
optimizer:
  class_path: hildtools.optimizers.SAM
  init_args:
    rho: 0.1
    adaptive: true
    base_optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.3, momentum: 0.9}
"""


def run_cli(args, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli"])  # pytest's own arguments are not for LightningCLI
    common = [
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = LightningCLI(CLIModule, args=args + common, run=False, save_config_callback=None)
    cli.trainer.fit(cli.model)
    assert cli.trainer.global_step == 2
    return cli.trainer.optimizers[0]


@pytest.mark.parametrize("case", CLI_CASES)
def test_lightning_cli_class_path(case, tmp_path, monkeypatch):
    args, cls, expected = CLI_CASES[case]
    opt = run_cli(args, tmp_path, monkeypatch)
    assert type(opt) is cls
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value
    if cls is SAM:
        assert type(opt.base_optimizer) is torch.optim.AdamW


def test_lightning_cli_sam_with_a_nested_base_optimizer_in_yaml(tmp_path, monkeypatch):
    config = tmp_path / "sam.yaml"
    config.write_text(SAM_YAML)
    opt = run_cli([f"--config={config}"], tmp_path, monkeypatch)
    assert type(opt) is SAM
    assert type(opt.base_optimizer) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["rho"], group["adaptive"], group["lr"], group["momentum"]) == (0.1, True, 0.3, 0.9)
    assert opt.state_dict()["state"][0].keys() == {"momentum_buffer"}  # the base momentum, checkpointed
