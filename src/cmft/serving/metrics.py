"""Prometheus metrics of `cmft serve`, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cmft_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram("cmft_request_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_texts = Histogram("cmft_batch_rows", "Model rows (texts or windows) per forward pass",
                                     buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_tokens = Histogram("cmft_batch_padded_tokens", "Padded tokens per forward pass",
                                      buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.forward = Histogram("cmft_forward_seconds", "Time of one forward pass", buckets=LATENCY_BUCKETS,
                                 registry=r)  # fmt: skip
        self.queue_depth = Gauge("cmft_queue_depth", "Requests waiting for a batch", registry=r)
        self.errors = Counter("cmft_errors", "Errors by kind", ["kind"], registry=r)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        known = endpoint if endpoint in {"/predict", "/search", "/health", "/ready", "/info", "/metrics"} else "other"
        self.requests.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)

    def observe(self, name: str, value: float) -> None:
        """Called by the batcher (any thread)."""
        if name == "queue_depth":
            self.queue_depth.set(value)
        elif name == "batch_texts":
            self.batch_texts.observe(value)
        elif name == "batch_tokens":
            self.batch_tokens.observe(value)
        elif name == "forward_seconds":
            self.forward.observe(value)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
