"""The server's health figures in the Prometheus text exposition format (version 0.0.4), written by hand: a few
counters, gauges and one latency histogram need no client library. Thread-safe: the event loop records requests,
the generation worker records tokens and cache bytes."""

from __future__ import annotations

import threading
import time

# Request latency buckets in seconds: a tiny model answers in milliseconds, a queued request on a CPU in seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "longcat"


class Metrics:
    """Counters since start-up, plus gauges of the generation in progress and the queue."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
        self.bucket_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generation_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self.cache_bytes = 0  # latent KV cache of the generation in progress (0 when idle)
        self.peak_cache_bytes = 0
        self.queue_depth = 0

    def request(self, path: str, status: int) -> None:
        """One answered HTTP request."""
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def latency(self, seconds: float) -> None:
        """One chat completion's time from arrival to its last byte, into the histogram."""
        with self._lock:
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.bucket_counts[i] += 1

    def generation(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.generation_seconds += seconds
            if seconds > 0:
                self.last_tokens_per_second = completion_tokens / seconds

    def set_cache_bytes(self, n: int) -> None:
        with self._lock:
            self.cache_bytes = n
            self.peak_cache_bytes = max(self.peak_cache_bytes, n)

    def set_queue_depth(self, n: int) -> None:
        with self._lock:
            self.queue_depth = n

    def render(self) -> str:
        """The exposition text: `# HELP`, `# TYPE` and the samples of each metric."""
        with self._lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                out.append(f"# HELP {PREFIX}_{name} {help_}")
                out.append(f"# TYPE {PREFIX}_{name} {kind}")
                out.extend(f"{PREFIX}_{name}{labels} {value:g}" for labels, value in samples)

            requests = [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(self.requests.items())]
            errors = [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(self.requests.items()) if s >= 400]
            metric("requests_total", "counter", "HTTP requests by path and status.", requests or [("", 0)])
            metric("request_errors_total", "counter", "HTTP requests answered with status >= 400.", errors or [("", 0)])
            # Cumulative, as Prometheus wants: `request` counts a latency in every bucket whose bound it is under.
            buckets = [(f'_bucket{{le="{b:g}"}}', n) for b, n in zip(LATENCY_BUCKETS, self.bucket_counts)]
            buckets += [('_bucket{le="+Inf"}', self.latency_count), ("_sum", self.latency_sum)]
            buckets.append(("_count", self.latency_count))
            out.append(f"# HELP {PREFIX}_request_latency_seconds Chat completion latency, queueing included.")
            out.append(f"# TYPE {PREFIX}_request_latency_seconds histogram")
            out.extend(f"{PREFIX}_request_latency_seconds{suffix} {value:g}" for suffix, value in buckets)
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
            metric("generation_seconds_total", "counter", "Seconds spent generating.", [("", self.generation_seconds)])
            metric(
                "tokens_per_second",
                "gauge",
                "Generated tokens per second of the last finished generation.",
                [("", self.last_tokens_per_second)],
            )
            metric(
                "kv_cache_bytes", "gauge", "Latent KV cache of the generation in progress.", [("", self.cache_bytes)]
            )
            metric("kv_cache_peak_bytes", "gauge", "Largest latent KV cache so far.", [("", self.peak_cache_bytes)])
            metric("queue_depth", "gauge", "Requests waiting or generating.", [("", self.queue_depth)])
            metric("uptime_seconds", "gauge", "Seconds since start-up.", [("", time.time() - self.started)])
            return "\n".join(out) + "\n"
