"""Representation and kernel metrics: functional forms and torchmetrics Metrics."""

from hildtools.metrics.capture import FeatureCapture
from hildtools.metrics.feature_rank import FeatureRank, feature_rank
from hildtools.metrics.invariant_sets import InvariantSetReport, LayerInvariantSets, invariant_sets
from hildtools.metrics.neural_collapse import NeuralCollapse, neural_collapse
