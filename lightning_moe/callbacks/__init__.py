"""Lightning callbacks: routing statistics for TensorBoard, stage export, metric summary, step time."""

from .export import SaveAdapters, SavePretrained
from .routing import RoutingStatistics
from .summary import MetricsSummary
from .timing import StepTimer

__all__ = ["SaveAdapters", "SavePretrained", "RoutingStatistics", "MetricsSummary", "StepTimer"]
