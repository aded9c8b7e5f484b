"""The quickstart and the curvature examples (edge of stability, Hessian inertia, silent alignment) at a tiny size.

Each example prints ``VERDICT <name>: PASS|FAIL ...`` and one ``[PASS]``/``[FAIL]`` line per criterion stated in its
docstring. The tiny runs must meet the criteria that a tiny run can meet, and a control run in which the phenomenon
is absent (lr too small for the edge of stability, lr 0, a large initialisation) must fail them. The quickstart's
offline W&B run holds every monitor's keys; a missing extra gives a one-line install hint.
"""

import argparse
import glob
import importlib
import os
import re
import subprocess
import sys

import pytest
from wandb_utils import history_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [
    "edge_of_stability",
    "hessian_inertia",
    "momentum_scaling",
    "neural_collapse",
    "optimizers_compare",
    "quickstart",
    "sam_feature_rank",
    "silent_alignment",
    "stochastic_collapse",
]
ENV = dict(
    os.environ,
    WANDB_MODE="offline",
    WANDB_SILENT="true",
    OMP_NUM_THREADS="1",
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
)  # this checkout's hildtools


def run_example(name, *args, code=None):
    command = (
        [sys.executable, os.path.join(ROOT, "examples", name), *args] if code is None else [sys.executable, "-c", code]
    )
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900, cwd=ROOT, check=False)
    return result


def verdict(stdout: str, name: str) -> tuple[str, dict[str, bool]]:
    """(PASS or FAIL, {criterion text: met}) of the one verdict printed."""
    lines = [line for line in stdout.splitlines() if line.startswith("VERDICT ")]
    assert len(lines) == 1, stdout[-3000:]
    match = re.match(rf"VERDICT {re.escape(name)}: (PASS|FAIL) \((\d+)/(\d+) criteria", lines[0])
    assert match, lines[0]
    criteria = {
        text: status == "PASS" for status, text in re.findall(r"^  \[(PASS|FAIL)\] (.+)$", stdout, re.MULTILINE)
    }
    assert len(criteria) == int(match.group(3)) and sum(criteria.values()) == int(match.group(2)), stdout[-3000:]
    assert (match.group(1) == "PASS") == all(criteria.values())
    return match.group(1), criteria


def ok(result) -> str:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    figure = re.search(r"^figure: (\S+\.png)$", result.stdout, re.MULTILINE)
    assert figure is None or os.path.isfile(figure.group(1))
    return result.stdout


def test_quickstart_logs_every_monitor_to_wandb_and_saves_figures(tmp_path):
    out = ok(run_example("quickstart.py", "--tiny", "--out", str(tmp_path)))
    keys = history_keys(str(tmp_path / "wandb"))
    for key in [
        "hessian/eig_0",
        "hessian/overlap_init",
        "eos/sharpness",
        "eos/threshold",
        "eos/ratio",
        "eos/at_edge",
        "ntk/target_alignment",
        "ntk/trace",
        "nc/classifier/nc1",
        "nc/features.5/nc1",
        "rank/classifier/pca_rank",
        "collapse/features.6/independent_fraction",
        "hessian/density/_type",
    ]:
        assert key in keys, key
    figures = glob.glob(str(tmp_path / "figures" / "*.png"))
    for prefix in ["hessian_density", "ntk_spectrum", "nc_classifier", "rank_classifier", "collapse_"]:
        assert any(os.path.basename(f).startswith(prefix) for f in figures), prefix
    assert "wandb sync" in out and "(not measured)" not in out and "Figures (PNG):" in out


def test_missing_scikit_learn_gives_the_install_hint():
    code = (
        "import sys; sys.modules['sklearn'] = None; sys.path[:0] = ['examples', '.']; import quickstart; "
        "quickstart.main(['--tiny', '--out', 'outputs/never'])"
    )
    result = run_example(None, code=code)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'this example needs scikit-learn, which is not installed: pip install -e ".[examples]"'
    )


@pytest.mark.slow
def test_quickstart_without_matplotlib_prints_no_figures_folder(tmp_path):
    code = (
        "import sys; sys.path[:0] = ['examples', '.']; import quickstart; "
        "sys.modules['matplotlib.figure'] = None; "  # hildtools.logging.new_figure imports it lazily
        f"quickstart.main(['--tiny', '--out', {str(tmp_path)!r}])"
    )
    out = ok(run_example(None, code=code))
    assert "Figures (PNG)" not in out and "No figures written" in out
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_flag_has_help_and_the_help_shows_defaults(name, monkeypatch):
    """Builds each example's parser in-process (parse_args intercepted) and checks its actions."""
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        (module.parse_args if name == "silent_alignment" else module.main)([])
    parser = parsers[0]
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    options = {option for action in parser._actions for option in action.option_strings}
    assert "--seed" in options and (name == "quickstart" or "--seeds" in options)
    assert [a.dest for a in parser._actions if not a.help] == []


@pytest.mark.slow
def test_edge_of_stability_passes_and_a_small_lr_fails(tmp_path):
    status, criteria = verdict(
        ok(run_example("edge_of_stability.py", "--tiny", "--out", str(tmp_path))), "edge_of_stability[gd]"
    )
    assert status == "PASS" and len(criteria) == 2, criteria
    status, criteria = verdict(
        ok(run_example("edge_of_stability.py", "--tiny", "--lrs", "0.02", "--out", str(tmp_path / "control"))),
        "edge_of_stability[gd]",
    )
    assert status == "FAIL"
    assert not criteria["lr 0.02: median sharpness / threshold over the second half in [0.9, 1.2]"]


def test_adam_gets_its_own_default_lr_and_names_the_preconditioned_sharpness(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    module = importlib.import_module("edge_of_stability")
    assert module.DEFAULT_LRS["adam"] == [0.01] and module.DEFAULT_LRS["gd"][0] == 0.2


@pytest.mark.slow
def test_hessian_inertia_meets_the_tiny_criteria_and_lr_zero_fails_the_early_rotation(tmp_path):
    out = ok(run_example("hessian_inertia.py", "--tiny", "--out", str(tmp_path)))
    _, criteria = verdict(out, "hessian_inertia")
    assert criteria["median consecutive overlap over the second half >= 0.9"]
    assert criteria["overlap of the middle measurement with the final one >= 0.7"]
    assert float(re.search(r"first to end ([\d.]+)", out).group(1)) < 0.8  # it moved, unlike the lr-0 control
    status, criteria = verdict(
        ok(run_example("hessian_inertia.py", "--tiny", "--lr", "0", "--out", str(tmp_path / "control"))),
        "hessian_inertia",
    )
    assert status == "FAIL"
    assert not criteria["the subspace moved early: final overlap with the first measurement < 0.5"]


@pytest.mark.slow
def test_silent_alignment_passes_and_a_large_initialisation_fails(tmp_path):
    status, criteria = verdict(
        ok(run_example("silent_alignment.py", "--tiny", "--out", str(tmp_path))), "silent_alignment"
    )
    assert status == "PASS" and len(criteria) == 4, criteria
    status, criteria = verdict(
        ok(run_example("silent_alignment.py", "--tiny", "--init-scale", "0.5", "--out", str(tmp_path / "control"))),
        "silent_alignment",
    )
    assert status == "FAIL" and not criteria["small init: task alignment rises by >= 0.1"]


def test_verdict_over_seeds_passes_only_when_every_seed_does(monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    common = importlib.import_module("phenomena_common")
    combined = common.combine([[("rises", True), ("falls", True)], [("rises", False), ("falls", True)]])
    assert combined == [("rises (1/2 seeds)", False), ("falls (2/2 seeds)", True)]
    assert common.mean_spread([1.0, 2.0, 3.0], ".2f") == "2.00 ± 1.00"
    assert common.mean_spread([0.5, None], ".2f") == "0.50" and common.mean_spread([None]) == "n/a"
    assert not common.report("demo", combined, "numbers", None, [0, 1])
    status, criteria = verdict(capsys.readouterr().out, "demo")
    assert status == "FAIL" and criteria == {"rises (1/2 seeds)": False, "falls (2/2 seeds)": True}
