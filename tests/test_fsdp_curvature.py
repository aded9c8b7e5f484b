"""HessianEigenMonitor and EdgeOfStabilityMonitor under FSDP (2 CPU processes, gloo): Lightning's FSDPStrategy
(FSDP1, original and flat parameters) and ModelParallelStrategy with ``fully_shard`` (FSDP2). Products are finite
differences of gradients on the sharded model, Lanczos runs on the local shards with all-reduced inner products;
the eigenvalues equal those of the dense fp64 Hessian of the whole model on the union of the ranks' probe data,
every rank holds the same values, and training with the monitors attached is bitwise the same as without."""

import pytest
import torch
from ddp_utils import run_ranks
from test_curvature_reference import dense_hessian
from test_fsdp import FullWeights, Net, global_probe, make_strategy, train
from torch import nn

from hildtools.callbacks import (
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
)
from hildtools.curvature import hessian_eigenpairs


class SmoothNet(Net):
    """:class:`test_fsdp.Net` with tanh in place of ReLU: finite differences need a smooth loss."""

    def __init__(self, sharding=None, optimizer=torch.optim.SGD):
        super().__init__(sharding, optimizer)
        self.net[3] = nn.Tanh()


def cross_entropy(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def monitors(probe):
    """A forward-only monitor first: its no-grad forwards leave FSDP's root gathered, which the curvature handles."""
    return [
        FeatureRankMonitor(layers="net.2", every_n_steps=3, **probe),
        HessianEigenMonitor(k=2, every_n_steps=3, tol=1e-4, **probe),
        EdgeOfStabilityMonitor(every_n_steps=3, tol=1e-3, **probe),
    ]


def fit_on_rank(rank, world_size, sharding, sizes, with_monitors=True):
    x, y = global_probe()
    start = sum(sizes[:rank])
    probe = {"probe_data": (x[start : start + sizes[rank]], y[start : start + sizes[rank]])}
    attached = monitors(probe) if with_monitors else []
    full = FullWeights()
    train(make_strategy(sharding, world_size), world_size, SmoothNet(sharding), [*attached, full], max_steps=3)
    return {
        "state": full.state,
        "metrics": [dict(m.last_metrics) for m in attached],
        "methods": [m.method for m in attached[1:]],
    }


def reference(state, n):
    model = SmoothNet().double()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    x, y = global_probe()
    hessian = dense_hessian(model, cross_entropy, (x[:n].double(), y[:n]))
    return torch.linalg.eigvalsh(hessian).flip(0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding, sizes",
    [("fsdp", (20, 20)), ("fsdp", (28, 12)), ("fsdp_flat", (28, 12)), ("fsdp2", (20, 20)), ("fsdp2", (28, 12))],
)
def test_curvature_monitors_under_fsdp_equal_the_whole_model(sharding, sizes):
    first, second = run_ranks(fit_on_rank, sharding, sizes, timeout=240)
    assert first["metrics"] == second["metrics"] and first["methods"] == ["finite_difference"] * 2
    exact = reference(first["state"], sum(sizes))
    _, hessian, eos = first["metrics"]
    for i in range(2):
        assert hessian[f"hessian/eig_{i}"] == pytest.approx(float(exact[i]), rel=1e-3)
        assert abs(hessian[f"hessian/eig_{i}"] - exact[i]) <= hessian[f"hessian/eig_{i}_err"]
    assert eos["eos/sharpness"] == pytest.approx(float(exact[0]), rel=1e-3)
    assert abs(eos["eos/sharpness"] - exact[0]) <= eos["eos/sharpness_err"]
    assert eos["eos/threshold"] == pytest.approx(2 / 0.1)


def fit_twice(rank, world_size, sharding):
    runs = [fit_on_rank(rank, world_size, sharding, (20, 20), with_monitors) for with_monitors in (False, True)]
    return runs[0]["state"], runs[1]["state"], runs[1]["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "fsdp2"])
def test_curvature_monitors_leave_fsdp_training_bitwise_unchanged(sharding):
    for without, with_monitors, metrics in run_ranks(fit_twice, sharding, timeout=240):
        assert all(metrics)
        assert without.keys() == with_monitors.keys()
        for key, value in without.items():
            assert torch.equal(value, with_monitors[key]), key


def functional_on_rank(rank, world_size):
    """hessian_eigenpairs on a ``fully_shard``-ed model without Lightning: the vectors are this rank's shards."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    x, y = global_probe()
    shard = slice(rank * 20, rank * 20 + 20)
    result = hessian_eigenpairs(model, cross_entropy, (x[shard], y[shard]), k=2, tol=1e-6)
    try:
        hessian_eigenpairs(model, cross_entropy, (x[shard], y[shard]), hvp="autograd")
        refusal = None
    except ValueError as error:
        refusal = str(error)
    size = sum(p.to_local().numel() for p in model.parameters())
    return whole, result.eigenvalues, tuple(result.eigenvectors.shape), size, refusal


def test_functional_api_on_an_fsdp2_model():
    (whole, values, shape, size, refusal), (_, other, other_shape, other_size, _) = run_ranks(functional_on_rank)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model.load_state_dict({k: v.double() for k, v in whole.items()})
    x, y = global_probe()
    exact = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, (x.double(), y))).flip(0)
    assert torch.equal(values, other) and torch.allclose(values, exact[:2], rtol=1e-4)
    assert shape == (size, 2) and other_shape == (other_size, 2) and size + other_size == 147  # local shards only
    assert refusal is not None and "hvp='autograd' is impossible for a sharded (fsdp2) model" in refusal
