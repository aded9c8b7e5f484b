"""The transformer example: a tiny run meets every PASS criterion, and the criteria fail when a phenomenon is
absent (sharpness far below 38/lr, a plateau that ignores the learning rate, an edge held from the start, NC1 that
does not fall)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from transformer_lm import criteria


@pytest.mark.slow
def test_tiny_run_passes_every_criterion_and_saves_a_figure(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "transformer_lm.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VERDICT transformer_lm: PASS (6/6 criteria, seed 0)" in result.stdout, result.stdout[-3000:]
    assert os.path.isfile(tmp_path / "transformer_lm.png")


def rows(lr, sharpness):
    return [(10 * (i + 1), 1.0, s, 38 / lr) for i, s in enumerate(sharpness)]


def passes(runs, nc1):
    return all(ok for _, ok in criteria(runs, nc1))


def test_criteria_fail_without_the_phenomenon():
    rising = [0.2, 0.5, 0.9, 1.0, 0.95, 1.05, 1.0, 0.9]
    collapsing, flat = [(0, 5.0), (100, 1.0)], [(0, 5.0), (100, 4.0)]
    at_edge = {1e-3: rows(1e-3, [r * 38e3 for r in rising]), 5e-4: rows(5e-4, [r * 76e3 for r in rising])}
    assert passes(at_edge, collapsing)
    assert not passes(at_edge, flat)
    below = {1e-3: rows(1e-3, [r * 19e3 for r in rising]), 5e-4: rows(5e-4, [r * 38e3 for r in rising])}
    assert not passes(below, collapsing)
    same_plateau = {1e-3: rows(1e-3, [r * 38e3 for r in rising]), 5e-4: rows(5e-4, [r * 38e3 for r in rising])}
    assert not passes(same_plateau, collapsing)
    started_at_edge = {lr: rows(lr, [38 / lr] * 8) for lr in (1e-3, 5e-4)}
    assert not passes(started_at_edge, collapsing)
