"""The phenomenon examples (neural collapse, SAM feature rank, stochastic collapse, optimizers, momentum scaling) at
a tiny size, each next to a control run in which the phenomenon is absent.

Each example prints ``VERDICT <name>: PASS|FAIL ...`` and one ``[PASS]``/``[FAIL]`` line per criterion of its
docstring. The tests assert the criteria a tiny run can meet and that the control fails them, and bound the tiny
runs' numbers; with ``--wandb`` the offline run holds the expected keys (read back from its .wandb file).

All runs start together (each a subprocess, OMP_NUM_THREADS=1) and every test waits for its own, so the file costs
about one Lightning import plus the longest run instead of their sum.
"""

import os
import re
import subprocess
import sys

import pytest
from test_examples_curvature import ENV, verdict
from wandb_utils import history_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"

RUNS = {  # run id: (example, extra flags)
    "neural_collapse": ("neural_collapse", ["--wandb"]),
    "neural_collapse_lr0": ("neural_collapse", ["--lr", "0"]),
    "sam_feature_rank": ("sam_feature_rank", []),
    "stochastic_collapse": ("stochastic_collapse", []),
    "stochastic_collapse_no_noise": ("stochastic_collapse", ["--label-noise", "0"]),
    "optimizers_compare": ("optimizers_compare", []),
    "momentum_scaling": ("momentum_scaling", ["--wandb"]),
    "momentum_scaling_no_noise": ("momentum_scaling", ["--label-noise", "0"]),
}
WANDB_KEYS = {
    "neural_collapse": ["nc/classifier/nc1", "nc/hidden.1/nc1", "nc/classifier/nc2_max_angle", "train/loss"],
    "momentum_scaling": ["step", "fixed/lr_0.01/test_error", "scaled/lr_0.0025/test_error"],
}


pytestmark = pytest.mark.slow  # eight tiny runs, in parallel


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Start every run at once; yields {run id: (out_dir, log_path, process)} and stops stragglers at the end."""
    env = ENV  # this checkout's hildtools first
    runs = {}
    for run_id, (name, flags) in RUNS.items():
        out = tmp_path_factory.mktemp(run_id)
        log = out / "stdout.txt"
        with open(log, "w") as sink:
            command = [
                sys.executable,
                os.path.join(ROOT, "examples", f"{name}.py"),
                "--tiny",
                "--out",
                str(out),
                *flags,
            ]
            runs[run_id] = (
                out,
                log,
                subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
            )
    yield runs
    for _, _, process in runs.values():
        if process.poll() is None:
            process.kill()


def finished(launched, run_id) -> str:
    out, log, process = launched[run_id]
    returncode = process.wait(timeout=900)
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    figures = re.findall(r"^figure: (\S+\.png)$", text, flags=re.MULTILINE)
    assert len(figures) == 1 and figures[0].startswith(str(out))
    with open(figures[0], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(figures[0]) > 10_000
    return text


def test_neural_collapse_nc1_falls_and_does_not_without_training(launched):
    _, criteria = verdict(finished(launched, "neural_collapse"), "neural_collapse")
    assert criteria["last-layer NC1 falls >= 2x over training"]
    status, control = verdict(finished(launched, "neural_collapse_lr0"), "neural_collapse")
    assert status == "FAIL" and not control["last-layer NC1 falls >= 2x over training"]
    assert not control["training error reaches 0"]


def test_sam_feature_rank_measures_from_step_zero(launched):
    text = finished(launched, "sam_feature_rank")
    _, criteria = verdict(text, "sam_feature_rank")
    assert criteria["SGD's final rank below n = 50"]
    match = re.search(
        rf"at steps 0 -> 10 -> 200: SGD {NUMBER} -> {NUMBER} -> {NUMBER}, SAM rho=0.2 {NUMBER} -> "
        rf"{NUMBER} -> {NUMBER}",
        text,
    )
    assert match, text[-2000:]
    ranks = [float(g) for g in match.groups()]
    assert ranks[0] == ranks[3]  # same seed, same initialisation: the same rank before the first step
    assert all(1 <= r <= 50 for r in ranks)  # at most n = 50 training inputs


def test_stochastic_collapse_needs_the_label_noise(launched):
    status, criteria = verdict(finished(launched, "stochastic_collapse"), "stochastic_collapse")
    assert criteria["at equal time lr x steps, the independent fraction falls as the lr grows"]
    assert criteria["the noisiest run (largest lr, base batch) collapses to <= 0.8"]
    assert criteria["control without label noise (largest lr) keeps >= 0.95"]
    status, control = verdict(finished(launched, "stochastic_collapse_no_noise"), "stochastic_collapse")
    assert status == "FAIL" and not control["the noisiest run (largest lr, base batch) collapses to <= 0.8"]


def test_optimizers_train_and_sgd_at_lr_10_does_not(launched):
    text = finished(launched, "optimizers_compare")
    verdict(text, "optimizers_compare")
    match = re.search(
        rf"adamw \(lr 0.003\) {NUMBER}, lion \(lr 0.0003\) {NUMBER}, signum \(lr 0.0003\) {NUMBER}; "
        rf"NGN by sigma 0.1: {NUMBER}, 10: {NUMBER}; SGD by lr 0.1: {NUMBER}, 10: {NUMBER}",
        text,
    )
    assert match, text[-2000:]
    adamw, lion, signum, ngn_small, ngn_large, sgd_small, sgd_large = (float(g) for g in match.groups())
    assert min(adamw, lion, signum, ngn_small, ngn_large, sgd_small) > 0.8  # one epoch: all trained
    assert sgd_large == 0.0  # SGD at lr 10 does not train (reported as 0); NGN at sigma 10 does


def test_momentum_scaling_beats_a_fixed_beta_and_needs_the_label_noise(launched):
    _, criteria = verdict(finished(launched, "momentum_scaling"), "momentum_scaling")
    assert criteria["scaled beta reaches the target at every lr"]
    assert criteria["scaled beta reaches it sooner than the fixed beta at every smaller lr"]
    status, control = verdict(finished(launched, "momentum_scaling_no_noise"), "momentum_scaling")
    assert status == "FAIL" and not control["scaled beta reaches the target at every lr"]


@pytest.mark.parametrize("run_id", list(WANDB_KEYS))
def test_wandb_offline_run_holds_the_expected_keys(launched, run_id):
    text = finished(launched, run_id)
    assert "wandb sync" in text
    keys = history_keys(str(launched[run_id][0] / "wandb"))
    missing = [key for key in WANDB_KEYS[run_id] if key not in keys]
    assert not missing, (missing, sorted(keys)[:50])
