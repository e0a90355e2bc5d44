"""Lightning callbacks: routing statistics for TensorBoard, stage export, metric summary."""

from .export import SavePretrained
from .routing import RoutingStatistics
from .summary import MetricsSummary

__all__ = ["SavePretrained", "RoutingStatistics", "MetricsSummary"]
