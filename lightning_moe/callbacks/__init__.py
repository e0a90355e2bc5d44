"""Lightning callbacks: routing statistics and the continual accuracy matrix for TensorBoard, stage export,
metric summary, step time and memory, the step-counting progress bar, prediction writer, EdgeMoE expert
offloading in predict/test, the non-finite guard and the atomic checkpoint writer every CLI run gets."""

from .checkpoint_io import AtomicCheckpointIO
from .continual import AccuracyMatrixImage
from .export import SaveAdapters, SavePretrained
from .guards import NonFiniteError, NonFiniteGuard
from .offloading import ExpertOffloading
from .predictions import PredictionWriter
from .profile import StageProfile
from .progress import StepProgressBar
from .routing import RoutingStatistics
from .summary import MetricsSummary

__all__ = ["AccuracyMatrixImage", "SaveAdapters", "SavePretrained", "RoutingStatistics", "MetricsSummary", "StageProfile",
           "PredictionWriter", "ExpertOffloading", "StepProgressBar", "NonFiniteGuard", "NonFiniteError",
           "AtomicCheckpointIO"]
