"""OpenTelemetry tracing: a tracer provider that exports over OTLP when configured."""

import logging

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from morgana import __version__

log = logging.getLogger(__name__)


def configure_tracing(service_name: str, otlp_endpoint: str | None) -> TracerProvider | None:
    """Install a global tracer provider exporting to `otlp_endpoint` (OTLP/HTTP).

    Without an endpoint nothing is installed and spans stay no-ops (near zero cost).
    """
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name, "service.version": __version__}))
    endpoint = otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    log.info("tracing exported over OTLP", extra={"otlp_endpoint": endpoint})
    return provider
