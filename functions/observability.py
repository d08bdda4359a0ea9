"""Structured logs (Powertools Logger) and EMF metrics (Powertools Metrics) shared by the functions.

One logger and one metrics object per process: Powertools keeps the metric set
per namespace anyway, and the handlers flush it after each invocation
(``@metrics.log_metrics``). Log lines carry names, ids, statuses and timings,
never a token, key, SQL text or stack trace.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "credits")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Credits")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)

__all__ = ["NAMESPACE", "SERVICE", "MetricUnit", "count", "logger", "metrics"]


def count(name: str, value: float = 1) -> None:
    """Add to a count metric; a metrics failure must never fail a request."""
    try:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
    except Exception:  # noqa: S110 - metrics are best effort
        pass
