"""Lightning callbacks: routing statistics for TensorBoard, stage export, metric summary, prediction writer."""

from .export import SavePretrained
from .predictions import PredictionWriter
from .routing import RoutingStatistics
from .summary import MetricsSummary

__all__ = ["SavePretrained", "RoutingStatistics", "MetricsSummary", "PredictionWriter"]
