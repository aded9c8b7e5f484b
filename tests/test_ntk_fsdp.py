"""NTKAlignmentMonitor(method="sketch") under FSDP (2 CPU processes, gloo): FSDP1 (FSDPStrategy, original and
flat parameters) and FSDP2 (ModelParallelStrategy + fully_shard). The in-place sketch equals the functional one on
an unsharded model; under FSDP every rank logs the same kernel, whose error against the exact kernel of the whole
final model is that of the stated variance, and training is bitwise the same as without the monitor."""

import pytest
import torch
from ddp_utils import run_ranks
from test_fsdp import FullWeights, Net, global_probe, make_strategy, train

from hildtools.callbacks import NTKAlignmentMonitor
from hildtools.metrics import empirical_ntk
from hildtools.metrics.ntk_sketch import sketched_jacobian_in_place

SKETCH_DIM = 300


def test_in_place_sketch_equals_the_functional_sketch_and_restores_the_parameters():
    model = Net().double().eval()
    x = global_probe(10)[0].double()
    before = [p.detach().clone() for p in model.parameters()]
    sketched = sketched_jacobian_in_place(lambda: model(x), list(model.parameters()), 8, seed=4)
    flat = sketched.reshape(10, -1)
    expected = empirical_ntk(model, x, method="sketch", sketch_dim=8, seed=4)
    torch.testing.assert_close(flat @ flat.T, expected, rtol=1e-9, atol=0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def fit_on_rank(rank, world_size, sharding):
    states, kernels, metrics = [], [], []
    for with_monitor in (False, True):
        probe = global_probe(12)
        monitor = NTKAlignmentMonitor(
            every_n_steps=3, probe_data=probe, method="sketch", sketch_dim=SKETCH_DIM, output="index",
            output_index=1, seed=2,
        )  # fmt: skip
        full = FullWeights()
        callbacks = [monitor, full] if with_monitor else [full]
        train(make_strategy(sharding, world_size), world_size, Net(sharding), callbacks, max_steps=3)
        states.append(full.state)
        if with_monitor:
            kernels.append(monitor.last_kernel.cpu())
            metrics.append(dict(monitor.last_metrics))
    return states, kernels[0], metrics[0]


@pytest.mark.parametrize("sharding", ["fsdp", pytest.param("fsdp_flat", marks=pytest.mark.slow), "fsdp2"])
def test_sketch_monitor_runs_under_fsdp_with_the_stated_accuracy(sharding):
    first, second = run_ranks(fit_on_rank, sharding, timeout=240)
    (without, with_monitor), kernel, metrics = first
    for key, value in without.items():
        assert torch.equal(value, with_monitor[key]), key  # training untouched
    torch.testing.assert_close(second[1], kernel, rtol=0, atol=0)  # every rank holds the same kernel
    assert first[2] == second[2] and {"ntk/trace", "ntk/target_alignment", "ntk/init_alignment"} <= set(metrics)
    model = Net()
    model.load_state_dict(with_monitor)
    exact = empirical_ntk(model.eval(), global_probe(12)[0], output="index", output_index=1)
    expected_error = (exact.trace() ** 2 + exact.norm() ** 2) / SKETCH_DIM  # E ||K~ - K||_F^2
    assert 0.05 < float((kernel - exact).square().sum() / expected_error) < 4
