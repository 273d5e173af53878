"""Prometheus metrics for the agent, as plain observer methods the agent calls on events.

prometheus_client is imported only when a Metrics object is built, so an agent with metrics off
never needs it. Everything lives in a private CollectorRegistry: tests (and several agents in one
process) must not collide on the global default registry.

Bounded: every label takes values from a fixed set (error reasons are protocol codes) except the
context, which a publisher chooses; the first `max_context_labels` contexts get their own series,
all later ones share `context="other"` (docs/edge_agent.md, Metrics).
"""

from __future__ import annotations

# Seconds. Adaptation runs a few inner steps on a small CPU: tens of ms to seconds.
ADAPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Sample arrival -> prediction published: mostly ONNX predict, ms range.
PREDICT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


OTHER_CONTEXT = "other"


class Metrics:
    def __init__(self, namespace: str = "edge_agent", max_context_labels: int = 100):
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector,
                                       disable_created_metrics)

        # Counters and histograms would each add a `_created` series (a timestamp per series, twice the
        # series count, no use to a scraper that records its own start times).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, process_max_fds,
        # process_start_time_seconds, ... read from /proc at each scrape (Linux).
        ProcessCollector(registry=r)
        self.samples = Counter("samples", "Sensor samples received", namespace=ns, registry=r)
        self.predictions = Counter("predictions", "Predictions published", namespace=ns, registry=r)
        self.errors = Counter("errors", "Rejected payloads and failures, by reason", ["reason"], namespace=ns, registry=r)
        self.adaptations = Counter("adaptations", "Adaptation runs completed", namespace=ns, registry=r)
        self.reconnects = Counter("reconnects", "MQTT reconnections", namespace=ns, registry=r)
        self.adapt_seconds = Histogram(
            "adapt_seconds", "Time to run one adaptation", namespace=ns, registry=r, buckets=ADAPT_BUCKETS
        )
        self.prediction_latency = Histogram(
            "prediction_latency_seconds", "Sample received to prediction published",
            namespace=ns, registry=r, buckets=PREDICT_BUCKETS,
        )
        self.support_size = Gauge(
            "support_size", "Support-set size per context (beyond max_context_labels: 'other', the latest of them)",
            ["context"], namespace=ns, registry=r,
        )
        self.model = Info("model", "Loaded model bundle", namespace=ns, registry=r)
        self.queue_depth = Gauge("queue_depth", "Messages received, waiting for the worker", namespace=ns, registry=r)
        self.outbox = Gauge("outbox_size", "Predictions committed and not yet confirmed by the broker",
                            namespace=ns, registry=r)
        self.connected = Gauge("connected", "1 while the broker connection is up", namespace=ns, registry=r)
        self.last_adaptation = Gauge("last_adaptation_timestamp_seconds", "Unix time of the last finished "
                                     "adaptation (0: none since start)", namespace=ns, registry=r)
        self.max_context_labels = max_context_labels
        self._context_labels: set[str] = set()
        self._server = None

    # -- observers -------------------------------------------------------------------------------
    def on_sample(self) -> None:
        self.samples.inc()

    def on_prediction(self, latency_s: float) -> None:
        self.predictions.inc()
        self.prediction_latency.observe(latency_s)

    def on_error(self, reason: str) -> None:
        # `reason` must be a short fixed code (PayloadError.reason), never free text: each distinct
        # value is a new time series.
        self.errors.labels(reason=reason).inc()

    def on_adapt(self, seconds: float) -> None:
        self.adaptations.inc()
        self.adapt_seconds.observe(seconds)
        self.last_adaptation.set_to_current_time()

    def on_reconnect(self) -> None:
        self.reconnects.inc()

    def set_connected(self, up: bool) -> None:
        self.connected.set(1 if up else 0)

    def set_queue(self, depth: int, outbox: int) -> None:
        self.queue_depth.set(depth)
        self.outbox.set(outbox)

    def context_label(self, context: str) -> str:
        """The label a context's series use: its own name for the first max_context_labels contexts,
        then `other` (a publisher that invents context names must not grow /metrics)."""
        if context in self._context_labels:
            return context
        if len(self._context_labels) < self.max_context_labels and context != OTHER_CONTEXT:
            self._context_labels.add(context)
            return context
        return OTHER_CONTEXT

    def set_support_size(self, context: str, n: int) -> None:
        self.support_size.labels(context=self.context_label(context)).set(n)

    def set_model_version(self, version: str) -> None:
        self.model.info({"version": str(version)})

    # -- export ----------------------------------------------------------------------------------
    def start_server(self, host: str = "127.0.0.1", port: int = 9108):
        """Serve /metrics in a daemon thread. Returns prometheus_client's (server, thread) where the
        installed version provides them (>= 0.17), else None."""
        from prometheus_client import start_http_server

        self._server = start_http_server(port, addr=host, registry=self.registry)
        return self._server

    def stop_server(self) -> None:
        if isinstance(self._server, tuple):
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(5)
        self._server = None

    def render(self) -> bytes:
        """The exposition text, e.g. for logging or a test without HTTP."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
