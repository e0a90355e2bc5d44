"""Lightning callbacks: routing statistics for TensorBoard, stage export, metric summary."""

from .export import SaveAdapters, SavePretrained
from .routing import RoutingStatistics
from .summary import MetricsSummary

__all__ = ["SaveAdapters", "SavePretrained", "RoutingStatistics", "MetricsSummary"]
