"""OpenTelemetry for a service: traces with W3C propagation and metrics on Prometheus /metrics.

Each service calls `setup_telemetry` once at start. Metrics go through the OpenTelemetry API
(`opentelemetry.metrics.get_meter`) and are read by a Prometheus reader served on the service's
own metrics port, so an operator's Prometheus scrapes every process directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import start_http_server


@dataclass(frozen=True, kw_only=True)
class Telemetry:
    """What `setup_telemetry` set up: the bound metrics port, if any."""

    service: str
    metrics_port: int | None


def setup_telemetry(service: str, *, metrics_host: str, metrics_port: int | None) -> Telemetry:
    """Install tracer and meter providers for `service` and serve /metrics when a port is set."""
    resource = Resource.create({SERVICE_NAME: service})
    trace.set_tracer_provider(TracerProvider(resource=resource))
    readers = []
    bound_port: int | None = None
    if metrics_port is not None:
        readers.append(PrometheusMetricReader())
        server, _ = start_http_server(metrics_port, addr=metrics_host)
        bound_port = server.server_port
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    return Telemetry(service=service, metrics_port=bound_port)
