"""The phenomenon examples (neural collapse, SAM feature rank, stochastic collapse, optimizers, momentum scaling) run
end to end at a tiny size: each prints exactly one parseable verdict line and writes its figure; with ``--wandb``
the offline run holds the expected keys (read back from its .wandb file).

The five scripts start together (each a subprocess, OMP_NUM_THREADS=1) and every test waits for its own, so the
file costs about one Lightning import plus the longest run instead of their sum.
"""

import os
import re
import subprocess
import sys

import pytest

from wandb_utils import history_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"

EXAMPLES = {  # name: (extra flags, verdict pattern, expected W&B keys)
    "neural_collapse": (
        ["--wandb"],
        rf"(?:train error 0 from epoch \d+|training error never reached 0 \(last {NUMBER} at epoch \d+\)).*"
        rf"NC1 {NUMBER}",
        ["nc/classifier/nc1", "nc/hidden.1/nc1", "nc/classifier/nc4", "train/loss"],
    ),
    "sam_feature_rank": (
        [], rf"feature rank at 99\.99% energy after 60 steps: SGD {NUMBER}, SAM rho=0\.2 {NUMBER} .*"
            rf"active ReLUs {NUMBER}, {NUMBER} of the hidden layer; test MSE {NUMBER}, {NUMBER}", None,
    ),
    "stochastic_collapse": (
        [], rf"after 40 steps: lr 0\.02/0\.1 at batch 32: {NUMBER}, {NUMBER} .*batch 32 at lr 0\.05: {NUMBER}", None,
    ),
    "optimizers_compare": (
        [], rf"after 1 epochs: adamw \(lr 0\.003\) val acc {NUMBER}, train loss {NUMBER}, lion \(lr 0\.0003\) val acc "
            rf"{NUMBER}.*signum \(lr 0\.0003\) val acc {NUMBER}.*NGN sigma=3 step size {NUMBER} \(epoch 1\)", None,
    ),
    "momentum_scaling": (
        ["--wandb"],
        r"at lr 0\.01/0\.0025: fixed beta=0\.99: (?:not in 300|\d+), (?:not in 300|\d+); scaled 1-beta ∝ lr\^\(2/3\)",
        ["step", "fixed/lr_0.01/test_error", "scaled/lr_0.0025/test_error"],
    ),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Start every example at once; yields {name: (out_dir, log_path, process)} and stops stragglers at the end."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    runs = {}
    for name, (flags, _, _) in EXAMPLES.items():
        out = tmp_path_factory.mktemp(name)
        log = out / "stdout.txt"
        with open(log, "w") as sink:
            script = os.path.join(ROOT, "examples", f"{name}.py")
            command = [sys.executable, script, "--tiny", "--out", str(out), *flags]
            runs[name] = (out, log, subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    yield runs
    for _, _, process in runs.values():
        if process.poll() is None:
            process.kill()


def finished_output(launched, name) -> str:
    out, log, process = launched[name]
    returncode = process.wait(timeout=600)
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    return text


def verdict_of(text: str, name: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("VERDICT ")]
    assert len(lines) == 1, lines
    prefix = f"VERDICT {name}: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_prints_one_verdict_and_writes_its_figure(launched, name):
    text = finished_output(launched, name)
    match = re.search(EXAMPLES[name][1], verdict_of(text, name))
    assert match, verdict_of(text, name)
    assert all(g is None or abs(float(g)) < 1e6 for g in match.groups())
    figures = re.findall(r"^figure: (\S+\.png)$", text, flags=re.MULTILINE)
    assert len(figures) == 1 and figures[0].startswith(str(launched[name][0]))
    with open(figures[0], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(figures[0]) > 10_000


@pytest.mark.parametrize("name", [name for name, (_, _, keys) in EXAMPLES.items() if keys])
def test_wandb_offline_run_holds_the_expected_keys(launched, name):
    text = finished_output(launched, name)
    assert "wandb sync" in text
    keys = history_keys(str(launched[name][0] / "wandb"))
    missing = [key for key in EXAMPLES[name][2] if key not in keys]
    assert not missing, (missing, sorted(keys)[:50])


def test_stochastic_collapse_fractions_and_sam_ranks_are_in_range(launched):
    collapse = verdict_of(finished_output(launched, "stochastic_collapse"), "stochastic_collapse")
    fractions = [float(x) for x in re.findall(r"(?<![\d.])(\d\.\d\d)(?![\d])", collapse)]
    assert fractions and all(0 < f <= 1 for f in fractions)
    sam = re.search(EXAMPLES["sam_feature_rank"][1], verdict_of(finished_output(launched, "sam_feature_rank"),
                                                                 "sam_feature_rank"))
    sgd_rank, sam_rank, sgd_active, sam_active = (float(g) for g in sam.groups()[:4])
    assert 1 <= sgd_rank <= 20 and 1 <= sam_rank <= 20  # at most the 20 training inputs
    assert 0 <= sgd_active <= 100 and 0 <= sam_active <= 100
