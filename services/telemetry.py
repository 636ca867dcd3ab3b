"""Observability: Prometheus metrics through Ray Serve's metrics API, OpenTelemetry spans.

Metrics (exported by every Ray node's metrics agent in Prometheus text format,
with Serve's ``application`` / ``deployment`` / ``replica`` tags added; Ray
prefixes every name with ``ray_`` and counters get ``_total``, so the first
one is scraped as ``ray_cast_spec_num_drafts_total``):

=====================================  =========  ============================================
name                                   kind       meaning
=====================================  =========  ============================================
``cast_spec_num_drafts``               counter    speculation steps (one draft tree each)
``cast_spec_num_draft_tokens``         counter    drafted tree nodes (before reranking)
``cast_spec_num_accepted_tokens``      counter    drafted tokens the verifier accepted
``cast_spec_num_emitted_tokens``       counter    tokens committed (accepted + bonus)
``cast_spec_acceptance_length``        histogram  tokens committed per step (accepted + 1)
``cast_spec_tree_nodes``               histogram  tree nodes verified per step (root included)
``cast_step_latency_seconds``          histogram  per step, tag ``phase``: ``draft`` (drafter
                                                  forwards), ``verify`` (target forward),
                                                  ``transfer`` (the rest of the step's wall
                                                  time: handle calls, batching wait, object
                                                  transfer)
``cast_requests``                      counter    finished requests, tags ``protocol``, ``status``
``cast_verifier_occupancy``            gauge      live sessions on a verifier replica
``cast_verifier_batch_size``           gauge      sessions in the verifier's last forward
=====================================  =========  ============================================

Spans (OpenTelemetry SDK, exporter chosen by ``TelemetryConfig``): one
``cast.request`` span per request with a ``cast.step`` child per step; both
carry the request id as ``cast.request_id`` (children inherit it from their
parent through ``RequestIdPropagator``).
"""

from __future__ import annotations

import logging

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from ray.serve import metrics

from services.config import TelemetryConfig
from services.messages import StepOutput

logger = logging.getLogger(__name__)

ACCEPTANCE_BOUNDARIES = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32]
TREE_BOUNDARIES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256]
LATENCY_BOUNDARIES = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


def _exporter(config: TelemetryConfig) -> SpanExporter | None:
    if config.tracing_exporter == "none":
        return None
    if config.tracing_exporter == "console":
        return ConsoleSpanExporter()
    if config.tracing_exporter == "memory":
        return InMemorySpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as err:
        raise ValueError(
            "telemetry.tracing_exporter: 'otlp' needs the opentelemetry-exporter-otlp package"
        ) from err
    return OTLPSpanExporter(endpoint=config.otlp_endpoint) if config.otlp_endpoint else OTLPSpanExporter()


REQUEST_ID_ATTRIBUTE = "cast.request_id"


class RequestIdPropagator(SpanProcessor):
    """Copies the parent span's ``cast.request_id`` onto every child span when it starts."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        parent = trace.get_current_span(parent_context)
        attributes = getattr(parent, "attributes", None) or {}
        if REQUEST_ID_ATTRIBUTE in attributes and REQUEST_ID_ATTRIBUTE not in (span.attributes or {}):
            span.set_attribute(REQUEST_ID_ATTRIBUTE, attributes[REQUEST_ID_ATTRIBUTE])


class Tracing:
    """A private tracer provider (not the global one) with the configured exporter."""

    def __init__(self, config: TelemetryConfig) -> None:
        self.exporter = _exporter(config)
        self.provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        self.provider.add_span_processor(RequestIdPropagator())
        if self.exporter is not None:
            batch = config.tracing_exporter == "otlp"
            self.provider.add_span_processor(
                BatchSpanProcessor(self.exporter) if batch else SimpleSpanProcessor(self.exporter)
            )
        self.tracer = self.provider.get_tracer("cast.services")

    def finished_spans(self) -> list[ReadableSpan]:
        """Spans kept by the in-memory exporter (empty for other exporters)."""
        if isinstance(self.exporter, InMemorySpanExporter):
            return list(self.exporter.get_finished_spans())
        return []

    def shutdown(self) -> None:
        self.provider.shutdown()


class RouterMetrics:
    """Speculative-decoding metrics recorded by the router, one call per step."""

    def __init__(self) -> None:
        self.drafts = metrics.Counter("cast_spec_num_drafts", description="Speculation steps (draft trees verified).")
        self.draft_tokens = metrics.Counter(
            "cast_spec_num_draft_tokens", description="Drafted tree nodes, before reranking."
        )
        self.accepted_tokens = metrics.Counter(
            "cast_spec_num_accepted_tokens", description="Drafted tokens accepted by the verifier."
        )
        self.emitted_tokens = metrics.Counter(
            "cast_spec_num_emitted_tokens", description="Tokens committed: accepted drafts plus bonus tokens."
        )
        self.acceptance_length = metrics.Histogram(
            "cast_spec_acceptance_length",
            description="Tokens committed per step (accepted drafts + 1).",
            boundaries=ACCEPTANCE_BOUNDARIES,
        )
        self.tree_nodes = metrics.Histogram(
            "cast_spec_tree_nodes",
            description="Tree nodes verified per step, root included.",
            boundaries=TREE_BOUNDARIES,
        )
        self.step_latency = metrics.Histogram(
            "cast_step_latency_seconds",
            description="Step latency by phase: draft, verify, transfer (wall time minus draft and verify).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("phase",),
        )
        self.requests = metrics.Counter(
            "cast_requests", description="Finished requests.", tag_keys=("protocol", "status")
        )

    def record_step(self, step: StepOutput, wall_s: float) -> None:
        """Record one verified step; ``wall_s`` is the router-side wall time of draft + verify."""
        self.drafts.inc()
        if step.nodes_drafted:
            self.draft_tokens.inc(step.nodes_drafted)
        if step.accepted:
            self.accepted_tokens.inc(step.accepted)
        self.emitted_tokens.inc(len(step.tokens))
        self.acceptance_length.observe(step.accepted + 1)
        self.tree_nodes.observe(step.verified_nodes)
        self.step_latency.observe(step.draft_s, tags={"phase": "draft"})
        self.step_latency.observe(step.verify_s, tags={"phase": "verify"})
        self.step_latency.observe(max(wall_s - step.draft_s - step.verify_s, 0.0), tags={"phase": "transfer"})

    def record_request(self, protocol: str, status: str) -> None:
        self.requests.inc(tags={"protocol": protocol, "status": status})


class VerifierMetrics:
    """Occupancy gauges of a verifier replica."""

    def __init__(self) -> None:
        self.occupancy = metrics.Gauge("cast_verifier_occupancy", description="Live sessions on the verifier replica.")
        self.batch_size = metrics.Gauge(
            "cast_verifier_batch_size", description="Sessions stepped in the verifier's last forward."
        )

    def record(self, occupancy: int, batch_size: int) -> None:
        self.occupancy.set(occupancy)
        self.batch_size.set(batch_size)
