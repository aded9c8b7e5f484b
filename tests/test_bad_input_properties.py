"""Property-based bad input: for every public constructor and function, generated invalid values of each argument
raise ValueError/TypeError whose message names the argument (never an error from deep inside torch), and valid
edge values are accepted."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hildtools.callbacks import (
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
    InvariantSetMonitor,
    NeuralCollapseMonitor,
    NTKAlignmentMonitor,
)
from hildtools.curvature import hessian_eigenpairs, hessian_trace, spectral_density
from hildtools.metrics import (
    FeatureCapture,
    FeatureRank,
    NeuralCollapse,
    empirical_ntk,
    feature_rank,
    invariant_sets,
    neural_collapse,
)
from hildtools.optimizers import NGN, SAM, Lion, MomentumScaling, Signum
from hildtools.probe import Probe

SETTINGS = settings(max_examples=25, deadline=None)

# value families: what is invalid for an argument of each kind
not_numbers = st.one_of(st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
non_positive_ints = st.integers(max_value=0)
bools = st.booleans()


def positive_int_invalid(minimum=1):
    return st.one_of(st.integers(max_value=minimum - 1), st.floats(allow_nan=True), not_numbers, bools)


schedule_invalid = positive_int_invalid().filter(lambda v: v is not None)  # None: the monitor's default schedule
optional_int_invalid = positive_int_invalid().filter(lambda v: v is not None)
figures_invalid = st.one_of(st.text(min_size=1, max_size=3), st.integers(), st.floats())
positive_float_invalid = st.one_of(st.floats(max_value=0.0), non_finite, not_numbers, bools)
unit_open_invalid = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), non_finite, not_numbers)
beta_invalid = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), non_finite)
negative_float = st.one_of(st.floats(max_value=-1e-9, allow_infinity=False), st.just(math.nan))
enum_invalid = st.one_of(st.text(max_size=6).filter(lambda t: t not in VALID_ENUMS), st.integers(), st.none())
VALID_ENUMS = {
    "eval",
    "train",
    "sum",
    "mean",
    "index",
    "projection",
    "full",
    "autograd",
    "func",
    "pyhessian",
    "hutch++",
    "hutchinson",
    "row",
    "column",
    "input",
    "output",
    "avg",
    "flatten",
}
MONITORS = {
    "HessianEigenMonitor": HessianEigenMonitor,
    "EdgeOfStabilityMonitor": EdgeOfStabilityMonitor,
    "NTKAlignmentMonitor": NTKAlignmentMonitor,
    "NeuralCollapseMonitor": lambda **kw: NeuralCollapseMonitor(**({"num_classes": 3} | kw)),
    "FeatureRankMonitor": FeatureRankMonitor,
    "InvariantSetMonitor": InvariantSetMonitor,
}
PROBING = [name for name in MONITORS if name != "InvariantSetMonitor"]
FEATURE_MONITORS = ["NeuralCollapseMonitor", "FeatureRankMonitor"]
WITH_FIGURES = [*FEATURE_MONITORS, "NTKAlignmentMonitor", "InvariantSetMonitor"]

MODEL = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
BATCH = (torch.randn(8, 4), torch.randint(0, 3, (8,)))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def expect_named_error(call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), f"{name!r} not named in: {info.value}"


CASES = [
    # (callable taking the argument as keyword, argument name, invalid strategy)
    (HessianEigenMonitor, "k", positive_int_invalid()),
    (HessianEigenMonitor, "tol", positive_float_invalid),
    (HessianEigenMonitor, "probe_size", positive_int_invalid()),
    (HessianEigenMonitor, "trace_samples", positive_int_invalid(3)),
    (HessianEigenMonitor, "bn_mode", enum_invalid),
    (
        EdgeOfStabilityMonitor,
        "edge_ratio",
        st.one_of(st.floats(max_value=0.0), st.floats(min_value=2.0001), non_finite, not_numbers),
    ),
    (EdgeOfStabilityMonitor, "optimizer_index", st.one_of(st.integers(max_value=-1), not_numbers, bools)),
    (EdgeOfStabilityMonitor, "max_iter", positive_int_invalid()),
    (lambda **kw: NeuralCollapseMonitor(**({"num_classes": 3} | kw)), "num_classes", positive_int_invalid(2)),
    (FeatureRankMonitor, "threshold", unit_open_invalid),
    (InvariantSetMonitor, "vanish_threshold", st.one_of(st.floats(max_value=0.0), non_finite, not_numbers)),
    (InvariantSetMonitor, "chunk_size", positive_int_invalid()),
    (NTKAlignmentMonitor, "output", enum_invalid),
    (NTKAlignmentMonitor, "probe_size", positive_int_invalid()),
    (lambda **kw: Probe(**kw), "probe_size", positive_int_invalid()),
    (lambda **kw: Probe(**kw), "bn_mode", enum_invalid),
    (lambda **kw: Lion(MODEL.parameters(), **kw), "lr", negative_float),
    (lambda **kw: Lion(MODEL.parameters(), **kw), "betas", st.tuples(beta_invalid, st.just(0.9))),
    (lambda **kw: Signum(MODEL.parameters(), **({"lr": 1e-3} | kw)), "momentum", beta_invalid),
    (lambda **kw: NGN(MODEL.parameters(), **kw), "lr", negative_float),
    (lambda **kw: NGN(MODEL.parameters(), **kw), "momentum", beta_invalid),
    (lambda **kw: SAM(MODEL.parameters(), torch.optim.SGD, lr=0.1, **kw), "rho", negative_float),
    (
        lambda **kw: MomentumScaling(torch.optim.SGD(MODEL.parameters(), lr=0.1, momentum=0.9), **kw),
        "C",
        st.one_of(st.floats(max_value=0.0), non_finite),
    ),
    (lambda **kw: hessian_eigenpairs(MODEL, loss_fn, BATCH, **kw), "k", positive_int_invalid()),
    (lambda **kw: hessian_eigenpairs(MODEL, loss_fn, BATCH, **kw), "tol", positive_float_invalid),
    (lambda **kw: hessian_eigenpairs(MODEL, loss_fn, BATCH, **kw), "backend", enum_invalid),
    (lambda **kw: hessian_trace(MODEL, loss_fn, BATCH, **kw), "num_samples", positive_int_invalid()),
    (lambda **kw: hessian_trace(MODEL, loss_fn, BATCH, **kw), "method", enum_invalid),
    (lambda **kw: spectral_density(MODEL, loss_fn, BATCH, **kw), "num_steps", positive_int_invalid()),
    (lambda **kw: feature_rank(torch.randn(10, 5), **kw), "threshold", unit_open_invalid),
    (lambda **kw: feature_rank(torch.randn(10, 5), **kw), "center", enum_invalid.filter(lambda v: v is not None)),
    (
        lambda **kw: neural_collapse(torch.randn(9, 4), torch.arange(9) % 3, **({"num_classes": 3} | kw)),
        "num_classes",
        positive_int_invalid(2),
    ),
    (
        lambda **kw: invariant_sets(MODEL, **kw),
        "identical_threshold",
        st.one_of(st.floats(max_value=0.0), non_finite, not_numbers),
    ),
    (lambda **kw: empirical_ntk(MODEL, BATCH[0], **kw), "output", enum_invalid),
    (
        lambda **kw: empirical_ntk(MODEL, BATCH[0], **kw),
        "chunk_size",
        positive_int_invalid().filter(lambda v: v is not None),
    ),  # None: the default chunk
    # every monitor: the schedule, the probe, the shared feature-monitor arguments
    *[(MONITORS[m], "every_n_steps", schedule_invalid) for m in MONITORS],
    *[(MONITORS[m], "every_n_epochs", schedule_invalid) for m in MONITORS],
    *[(MONITORS[m], "probe_size", positive_int_invalid()) for m in PROBING],
    *[(MONITORS[m], "bn_mode", enum_invalid) for m in PROBING],
    *[(MONITORS[m], "batch_size", positive_int_invalid()) for m in FEATURE_MONITORS],
    *[(MONITORS[m], "capture", enum_invalid) for m in FEATURE_MONITORS],
    *[(MONITORS[m], "pool", enum_invalid) for m in FEATURE_MONITORS],
    *[(MONITORS[m], "projection_dim", optional_int_invalid) for m in FEATURE_MONITORS],
    *[(MONITORS[m], "figures", figures_invalid) for m in WITH_FIGURES],
    (HessianEigenMonitor, "max_iter", positive_int_invalid().filter(lambda v: v is not None)),
    (EdgeOfStabilityMonitor, "tol", positive_float_invalid),
    (EdgeOfStabilityMonitor, "param_group", positive_int_invalid(0).filter(lambda v: v is not None)),
    (FeatureRankMonitor, "center", enum_invalid.filter(lambda v: v is not None)),
    (InvariantSetMonitor, "identical_threshold", st.one_of(st.floats(max_value=0.0), non_finite, not_numbers)),
    (NTKAlignmentMonitor, "chunk_size", optional_int_invalid),
    (NTKAlignmentMonitor, "sketch_dim", optional_int_invalid),
    # every metric class
    (FeatureRank, "threshold", unit_open_invalid),
    (FeatureRank, "center", enum_invalid.filter(lambda v: v is not None)),
    (FeatureRank, "num_features", optional_int_invalid),
    (
        lambda **kw: NeuralCollapse(**({"num_classes": 3, "num_features": 4} | kw)),
        "num_classes",
        positive_int_invalid(2),
    ),
    (
        lambda **kw: NeuralCollapse(**({"num_classes": 3, "num_features": 4} | kw)),
        "num_features",
        positive_int_invalid(),
    ),
    (lambda **kw: NeuralCollapse(**({"num_classes": 3, "num_features": 4} | kw)), "rtol", unit_open_invalid),
    (
        lambda **kw: NeuralCollapse(**({"num_classes": 3, "num_features": 4} | kw)),
        "classifier_weight",
        st.one_of(not_numbers.filter(lambda v: v is not None), st.integers(1, 5).map(lambda n: torch.zeros(n, 5))),
    ),
    (lambda **kw: FeatureCapture(MODEL, **kw), "capture", enum_invalid),
    (lambda **kw: FeatureCapture(MODEL, **kw), "pool", enum_invalid),
    (lambda **kw: FeatureCapture(MODEL, **kw), "projection_dim", optional_int_invalid),
]


@pytest.mark.parametrize("call, name, invalid", CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
@SETTINGS
@given(data=st.data())
def test_invalid_values_name_the_argument(call, name, invalid, data):
    value = data.draw(invalid, label=name)
    expect_named_error(lambda: call(**{name: value}), name)


VALID_EDGES = [
    lambda: HessianEigenMonitor(k=1, tol=1e-12, every_n_steps=1, probe_size=1, trace_samples=3, max_iter=1),
    lambda: EdgeOfStabilityMonitor(edge_ratio=2.0, optimizer_index=0, max_iter=1),
    lambda: NeuralCollapseMonitor(num_classes=2),
    lambda: FeatureRankMonitor(threshold=0.5),
    *[lambda make=make: make(every_n_epochs=1) for make in MONITORS.values()],
    lambda: FeatureRank(threshold=0.5, center=None, num_features=1),
    lambda: NeuralCollapse(num_classes=2, num_features=1, rtol=0.5),
    lambda: FeatureCapture(MODEL, layers="2", capture="output", pool="flatten", projection_dim=1),
    lambda: Lion(MODEL.parameters(), lr=0.0, betas=(0.0, 0.0)),
    lambda: Signum(MODEL.parameters(), lr=0.0, momentum=0.0),
    lambda: NGN(MODEL.parameters(), lr=1e-12, momentum=0.0),
    lambda: SAM(MODEL.parameters(), torch.optim.SGD, rho=0.0, lr=0.1),
    lambda: hessian_eigenpairs(MODEL, loss_fn, BATCH, k=1, tol=1e-12, max_iter=1),
    lambda: feature_rank(torch.randn(10, 5), threshold=1e-9),
    lambda: empirical_ntk(MODEL, BATCH[0], chunk_size=1),
]


@pytest.mark.parametrize("call", VALID_EDGES, ids=range(len(VALID_EDGES)))
def test_valid_edge_values_are_accepted(call):
    call()


@pytest.mark.parametrize("value", [True, False])
def test_feature_rank_refuses_a_bool_num_features(value):
    """A bool passed as an int and failed later inside torch.zeros."""
    expect_named_error(lambda: FeatureRank(num_features=value), "num_features")
