"""The server's health figures in the Prometheus text exposition format (version 0.0.4), written by hand: a few
counters, gauges and histograms need no client library. Thread-safe: the event loop records requests, the
scheduler thread records tokens, the batch and each request's queue wait, first token and time per token."""

from __future__ import annotations

import threading
import time

# Request latency buckets in seconds: a tiny model answers in milliseconds, a queued request on a CPU in seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Time per output token: one decoding step of a batch, from a tiny model's milliseconds to a large batch on a CPU.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Sequences per decoding step: powers of two up to the largest --max-batch worth trying on one machine.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PREFIX = "longcat"


class Histogram:
    """A Prometheus histogram: per-bucket counts (cumulative when rendered), sum and count."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        # Cumulative, as Prometheus wants: `observe` counts a value in every bucket whose bound it is under.
        name = f"{PREFIX}_{self.name}"
        out = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b:g}"}} {n}' for b, n in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:g}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters since start-up, histograms of request timings, and gauges of the batch and the queue."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
        self.latency_seconds = Histogram(
            "request_latency_seconds", "Chat completion latency, queueing included.", LATENCY_BUCKETS
        )
        self.queue_wait_seconds = Histogram(
            "queue_wait_seconds", "Seconds a request waited before joining the batch.", LATENCY_BUCKETS
        )
        self.first_token_seconds = Histogram(
            "time_to_first_token_seconds", "Seconds from arrival to the first generated token.", LATENCY_BUCKETS
        )
        self.token_seconds = Histogram(
            "time_per_output_token_seconds",
            "Seconds per generated token after the first, per request.",
            TOKEN_BUCKETS,
        )
        self.step_batch_size = Histogram("step_batch_size", "Sequences decoded by each batched step.", BATCH_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generation_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self.cache_bytes = 0  # latent KV cache of the sequences in the batch (0 when idle)
        self.peak_cache_bytes = 0
        self.queue_depth = 0
        self.batch_size = 0
        self.timeouts = 0

    def request(self, path: str, status: int) -> None:
        """One answered HTTP request."""
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def latency(self, seconds: float) -> None:
        """One chat completion's time from arrival to its last byte."""
        with self._lock:
            self.latency_seconds.observe(seconds)

    def started_request(self, queue_wait: float) -> None:
        """A request left the queue and joined the batch after `queue_wait` seconds."""
        with self._lock:
            self.queue_wait_seconds.observe(queue_wait)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.first_token_seconds.observe(seconds)

    def generation(self, prompt_tokens: int, completion_tokens: int, seconds: float, decoding: float = 0.0) -> None:
        """A finished generation: `seconds` from joining the batch to its end, `decoding` from its first token."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.generation_seconds += seconds
            if seconds > 0:
                self.last_tokens_per_second = completion_tokens / seconds
            if completion_tokens > 1:
                self.token_seconds.observe(decoding / (completion_tokens - 1))

    def step(self, batch_size: int) -> None:
        """One decoding step over `batch_size` sequences."""
        with self._lock:
            self.step_batch_size.observe(batch_size)

    def timed_out(self) -> None:
        with self._lock:
            self.timeouts += 1

    def set_batch(self, size: int, cache_bytes: int) -> None:
        """The running batch: sequences decoding and their latent cache bytes."""
        with self._lock:
            self.batch_size = size
            self.cache_bytes = cache_bytes
            self.peak_cache_bytes = max(self.peak_cache_bytes, cache_bytes)

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
            metric("request_timeouts_total", "counter", "Requests ended by the request timeout.", [("", self.timeouts)])
            for h in (
                self.latency_seconds,
                self.queue_wait_seconds,
                self.first_token_seconds,
                self.token_seconds,
                self.step_batch_size,
            ):
                out.extend(h.render())
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
            metric("generation_seconds_total", "counter", "Seconds spent generating.", [("", self.generation_seconds)])
            metric(
                "tokens_per_second",
                "gauge",
                "Generated tokens per second of the last finished generation.",
                [("", self.last_tokens_per_second)],
            )
            metric("batch_size", "gauge", "Sequences in the running batch.", [("", self.batch_size)])
            metric("kv_cache_bytes", "gauge", "Latent KV cache of the running batch.", [("", self.cache_bytes)])
            metric("kv_cache_peak_bytes", "gauge", "Largest latent KV cache so far.", [("", self.peak_cache_bytes)])
            metric("queue_depth", "gauge", "Requests waiting or generating.", [("", self.queue_depth)])
            metric("uptime_seconds", "gauge", "Seconds since start-up.", [("", time.time() - self.started)])
            return "\n".join(out) + "\n"
