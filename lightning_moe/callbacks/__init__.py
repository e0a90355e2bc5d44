"""Lightning callbacks: routing statistics for TensorBoard, stage export, metric summary, step time and memory."""

from .export import SavePretrained
from .profile import StageProfile
from .routing import RoutingStatistics
from .summary import MetricsSummary

__all__ = ["SavePretrained", "RoutingStatistics", "MetricsSummary", "StageProfile"]
