"""The quickstart and the curvature examples run end to end at a tiny size: the offline W&B run holds every
monitor's keys (read back from its .wandb file), the figures are written, the verdict lines parse."""

import glob
import os
import re
import subprocess
import sys

import pytest

from wandb_utils import history_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart_logs_every_monitor_to_wandb_and_saves_figures(tmp_path):
    out = run_example("quickstart.py", "--tiny", "--out", str(tmp_path))
    keys = history_keys(str(tmp_path / "wandb"))
    for key in ["hessian/eig_0", "hessian/overlap_init", "eos/sharpness", "eos/threshold", "eos/ratio",
                "eos/at_edge", "ntk/target_alignment", "ntk/trace", "nc/classifier/nc1", "nc/features.5/nc1",
                "rank/classifier/pca_rank", "collapse/features.6/independent_fraction", "hessian/density/_type"]:
        assert key in keys, key
    figures = glob.glob(str(tmp_path / "figures" / "*.png"))
    for prefix in ["hessian_density", "ntk_spectrum", "nc_classifier", "rank_classifier", "collapse_"]:
        assert any(os.path.basename(f).startswith(prefix) for f in figures), prefix
    assert "wandb sync" in out and "(not measured)" not in out


@pytest.mark.parametrize("name, pattern", [
    ("edge_of_stability.py", r"VERDICT edge_of_stability\[gd\]: sharpness hovered at ([\d.]+) x threshold"),
    ("hessian_inertia.py", r"VERDICT hessian_inertia: top-5 eigenspace overlap between consecutive measurements "
                           r"\(\d+ steps apart\) median ([\d.]+) over the second half of training \(first half "
                           r"([\d.]+)\); overlap with the first measurement ([\d.]+)"),
])
def test_curvature_examples_print_a_verdict_and_save_a_figure(name, pattern, tmp_path):
    out = run_example(name, "--tiny", "--out", str(tmp_path))
    match = re.search(pattern, out)
    assert match, out[-2000:]
    assert all(0 <= float(x) <= 2 for x in match.groups())
    figure = re.search(r"figure: (\S+\.png)", out).group(1)
    assert os.path.isfile(figure)
