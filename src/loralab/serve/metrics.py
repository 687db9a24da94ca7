"""The server's counters and gauges, in Prometheus' text format at ``GET /metrics``.

Each server has its own registry, so that several servers in one process (the tests) do
not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "loralab_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "loralab_prompt_tokens", "prompt tokens prefilled", registry=registry
        )
        self.generation_tokens = Counter(
            "loralab_generation_tokens", "tokens generated", registry=registry
        )
        self.running = Gauge("loralab_requests_running", "requests decoding", registry=registry)
        self.waiting = Gauge(
            "loralab_requests_waiting", "requests queued for a row", registry=registry
        )
        self.batch_size = Histogram(
            "loralab_batch_size",
            "rows in each decoding step",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "loralab_time_to_first_token_seconds",
            "from arrival to the first token",
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.adapters_resident = Gauge(
            "loralab_adapters_resident", "adapters on the model now", registry=registry
        )
        self.adapter_loads = Counter(
            "loralab_adapter_loads", "adapters read onto the model", registry=registry
        )
        self.adapter_evictions = Counter(
            "loralab_adapter_evictions",
            "adapters taken off the model for room",
            registry=registry,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
