"""Representation and kernel metrics: functional forms and torchmetrics Metrics."""

from hildtools.metrics.capture import FeatureCapture
from hildtools.metrics.feature_rank import FeatureRank, feature_rank
from hildtools.metrics.invariant_sets import InvariantSetReport, LayerInvariantSets, invariant_sets
from hildtools.metrics.kernel import (
    center_kernel,
    kernel_alignment,
    kernel_alignment_between,
    kernel_effective_rank,
    kernel_eigenvalues,
    kernel_trace,
    relative_change,
    target_alignment_numerator,
)
from hildtools.metrics.neural_collapse import NeuralCollapse, neural_collapse
from hildtools.metrics.ntk import empirical_ntk
