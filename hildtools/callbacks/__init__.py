"""Lightning callbacks: schedule + probe + metric + log."""

from hildtools.callbacks.edge_of_stability import EdgeOfStabilityMonitor
from hildtools.callbacks.feature_rank import FeatureRankMonitor
from hildtools.callbacks.hessian_eigen import HessianEigenMonitor
from hildtools.callbacks.invariant_sets import InvariantSetMonitor
from hildtools.callbacks.neural_collapse import NeuralCollapseMonitor
from hildtools.callbacks.ntk_alignment import NTKAlignmentMonitor
