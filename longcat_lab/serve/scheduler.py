"""The serving scheduler (docs/design.md §7.2): continuous batching of chat requests on one worker thread.

Requests wait in arrival order. Before each decoding step the scheduler admits waiting requests while the batch has a
free row (`max_batch`) and the step's token budget (`step_tokens`: one per running sequence plus the prompts prefilled
this step) allows, at least one per step; the admitted prompts are prefilled together in one forward and each one's
first token drawn at once. Then one forward decodes the next token of every running sequence
(`inference.batch.BatchDecoder`). A sequence that ends (a stop id, a stop string, max_tokens), whose client went away,
or that ran past the request timeout leaves the batch at once and its row is free for the next step. `max_batch=1` is
one request at a time.

Each request's text is kept by a `Reply`: the tokens it is fed become text deltas for its client, with stop strings
held back while they may be forming and tool calls held for the parser. Nothing a model writes is executed.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from longcat_lab.chat import parse_assistant
from longcat_lab.chat.template import TOOL_CALL_OPEN
from longcat_lab.inference.batch import BatchDecoder, Sequence
from longcat_lab.inference.text import TextStream, token_stream
from longcat_lab.serve.metrics import Metrics
from longcat_lab.serve.request import ChatRequest, Result

SHUTDOWN = (503, "the server is shutting down: this request was cancelled")


@dataclass(eq=False)
class Job:
    """A request in the scheduler. `emit` gets ("delta", text), then ("done", Result) or ("error", (status,
    message)), from the worker thread. `cancel` (the client went away, or shutdown with a reason) ends it at the
    next step."""

    request: ChatRequest
    emit: Callable[[tuple[str, Any]], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    abort: tuple[int, str] | None = None  # the error to answer with when cancelled by the server

    def cancel(self, abort: tuple[int, str] | None = None) -> None:
        self.abort = abort
        self.cancelled.set()

    def send(self, event: tuple[str, Any]) -> None:
        """`emit`, except that a client whose event loop has closed (the server is stopping) is not an error."""
        with contextlib.suppress(RuntimeError):
            self.emit(event)


class Reply:
    """One request's text as its tokens arrive (`feed`), streamed to its job as deltas; `result` at the end."""

    def __init__(self, job: Job, tokenizer, stop_ids: set[int]):
        self.job, self.request = job, job.request
        self._token: torch.Tensor | None = None
        self.decoded = TextStream(tokenizer, iter(lambda: self._token, None), stop_ids)
        self._texts = iter(self.decoded)
        self.fed, self.sent, self.text, self.cut = 0, 0, "", -1
        self.holding = False  # once a tool call starts, its text is held back for the parser
        self.finished = False

    def feed(self, token: int) -> bool:
        """Take the next token; emit the text that is safe to send; return whether the reply is complete."""
        r = self.request
        self._token = torch.tensor([[token]])
        self.fed += 1
        complete = next(self._texts, False)
        if complete is False:  # a stop id
            self.finished = True
            return True
        if complete is not None:  # else a UTF-8 character split between tokens: wait for the rest
            text = complete
            self.cut = min((p for p in (text.find(s) for s in r.stop) if p >= 0), default=-1)
            if self.cut >= 0:
                text = text[: self.cut]
            if r.tools and TOOL_CALL_OPEN in text:
                self.holding = True
            # A stop string may be forming at the end of the text: keep back what could be its start.
            safe = len(text) if self.cut >= 0 else len(text) - _partial_stop(text, r.stop)
            if not self.holding and safe > self.sent:
                self.job.send(("delta", text[self.sent : safe]))
                self.sent = safe
            self.text = text
        self.finished = self.cut >= 0 or self.fed >= r.max_tokens
        return self.finished

    def result(self) -> Result:
        """Send what was held back and return the finished reply (tool calls parsed when the request had tools)."""
        r, text = self.request, self.text
        if self.cut < 0:  # the whole text, a last character still missing bytes included
            text = self.decoded.text
        if not self.holding and len(text) > self.sent:  # what was held back as a possible stop-string start
            self.job.send(("delta", text[self.sent :]))
        finish = "stop" if self.decoded.stopped or self.cut >= 0 else "length"
        content, calls = text, []
        if r.tools:
            parsed = parse_assistant(text, r.tools)
            content, calls = parsed.content, parsed.tool_calls
            if calls:
                finish = "tool_calls"
        return Result(text, content, calls, finish, len(r.prompt_ids), len(self.decoded.ids))


def _partial_stop(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin one of `stops`."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass(eq=False)
class Running:
    """A job in the batch: its reply, its row's sequence, and when it joined and drew its first token."""

    job: Job
    reply: Reply
    sequence: Sequence
    joined: float
    first_token: float = 0.0


def _failure(err: Exception) -> tuple[str, Any]:
    """The answer to a request whose generation raised `err`: a 500 naming the error (the worker goes on)."""
    return ("error", (500, f"generation failed: {type(err).__name__}: {err}"))


class QueueFull(RuntimeError):
    """The queue holds `max_queue` requests already, or the server is shutting down (HTTP 503)."""


class Scheduler:
    """The worker thread that owns the model: admits queued jobs into the batch, steps it, ends jobs."""

    def __init__(
        self,
        model,
        tokenizer,
        stop_ids: set[int],
        metrics: Metrics,
        *,
        max_batch: int,
        step_tokens: int,
        max_queue: int,
        request_timeout: float | None,
        speculative: bool,
    ):
        self.model, self.tokenizer, self.stop_ids, self.metrics = model, tokenizer, stop_ids, metrics
        self.max_batch, self.step_tokens, self.max_queue = max_batch, step_tokens, max_queue
        self.request_timeout, self.speculative = request_timeout, speculative
        # The latent cache per token: [c_KV ; k_R] in every attention block (docs/design.md §1.2).
        self.cache_bytes_per_token = model.config.kv_cache_bytes_per_token(model.lm_head.weight.element_size())
        self.decoder = BatchDecoder(model, max_batch)
        self._running: dict[Sequence, Running] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._pending = 0  # waiting or running
        self._closing = self._stopping = False
        self.shutdown_cancelled = 0
        self._thread = threading.Thread(target=self._run, name="longcat-serve-scheduler", daemon=True)
        self._thread.start()

    # The request side (any thread) --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down: it takes no new requests")
            if self._pending >= self.max_queue:
                raise QueueFull(f"the server is busy: {self._pending} requests are queued (max_queue={self.max_queue})")
            self._pending += 1
            self.metrics.set_queue_depth(self._pending)
            self._waiting.append(job)
            self._cv.notify_all()

    def shutdown(self, grace: float) -> tuple[int, int]:
        """Take no new requests, let the running and waiting ones finish for up to `grace` seconds, then cancel
        what is left (each gets a 503 error) and stop the thread. Returns (finished, cancelled) of the requests that
        were in the scheduler when shutdown began."""
        deadline = time.monotonic() + grace
        with self._cv:
            if self._stopping:
                return 0, 0
            self._closing = True
            present = self._pending
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(60)
        return present - self.shutdown_cancelled, self.shutdown_cancelled

    # The worker thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            self._start(admitted)
            for run in list(self._running.values()):
                if (verdict := self._verdict(run.job)) is not None:
                    self._finish(run, verdict)
            if self._running:
                self._step()
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        self.shutdown_cancelled = len(waiting) + len(self._running)
        for job in waiting:
            self._end(job, ("error", SHUTDOWN))
        for run in list(self._running.values()):
            self._finish(run, ("error", SHUTDOWN))

    def _admit(self) -> list[Job]:
        """Pop the jobs that join this step (under the lock); end the waiting ones already cancelled or expired."""
        admitted, budget = [], self.step_tokens - len(self._running)
        for job in list(self._waiting):
            if (verdict := self._verdict(job)) is not None:
                self._waiting.remove(job)
                self._end(job, verdict if verdict[0] == "error" else ("error", (499, "cancelled while queued")))
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            cost = len(self._waiting[0].request.prompt_ids)
            if admitted and cost > budget:
                break
            admitted.append(self._waiting.popleft())
            budget -= cost
        return admitted

    def _verdict(self, job: Job) -> tuple[str, Any] | None:
        """None while `job` may go on; ("done", None) when its client went away; ("error", ...) when the server
        cancels it or it ran past the request timeout."""
        if job.cancelled.is_set():
            return ("error", job.abort) if job.abort is not None else ("done", None)
        if self.request_timeout is not None and time.perf_counter() - job.arrived > self.request_timeout:
            self.metrics.timed_out()
            return ("error", (504, f"the request ran past the request timeout of {self.request_timeout:g} s"))
        return None

    def _start(self, jobs: list[Job]) -> None:
        """Prefill the prompts of `jobs` together, draw each one's first token and add them to the batch."""
        runs = []
        for job in jobs:
            r, joined = job.request, time.perf_counter()
            self.metrics.started_request(joined - job.arrived)
            generator = torch.Generator(device=self.model.device).manual_seed(r.seed) if r.seed is not None else None
            seq = Sequence(r.prompt_ids, r.max_tokens, r.temperature, r.top_p, generator, r.logits_mask)
            run = Running(job, Reply(job, self.tokenizer, self.stop_ids), seq, joined)
            if not self.speculative:
                try:
                    self.decoder.check(seq)  # a bad prompt fails its own request, not the others joining with it
                    runs.append(run)
                except Exception as err:
                    self._end(job, _failure(err))
            elif r.logits_mask is not None:
                self._end(job, ("error", (400, "constrained decoding is not available with speculative decoding")))
            else:
                self._run_alone(run)
        if not runs:
            return
        try:
            tokens = self.decoder.join_many([run.sequence for run in runs])
        except Exception as err:  # a bug or an out-of-memory must fail these requests, not the worker
            for run in runs:
                if run.sequence in self.decoder.sequences:  # it joined before the failure: free its row
                    self.decoder.leave(run.sequence)
                self._end(run.job, _failure(err))
            return
        for run, token in zip(runs, tokens):
            self._running[run.sequence] = run
            self._first_token(run)
            self._feed(run, token)
        self._report_batch()

    def _first_token(self, run: Running) -> None:
        run.first_token = time.perf_counter()
        self.metrics.first_token(run.first_token - run.job.arrived)

    def _step(self) -> None:
        """One decoding step of the whole batch; each sequence that ends leaves at once."""
        self.metrics.step(len(self._running))
        try:
            tokens = self.decoder.step()
        except Exception as err:  # as in `_start`, but the step was every running request's
            failed = _failure(err)
            for run in list(self._running.values()):
                self._finish(run, failed)
            self.decoder = BatchDecoder(self.model, self.max_batch)
            return
        for seq, token in zip(list(self.decoder.sequences), tokens):
            self._feed(self._running[seq], token)
        self._report_batch()

    def _feed(self, run: Running, token: int) -> None:
        """Hand `token` to `run`'s reply; finish the run if that was its last (or the reply failed)."""
        try:
            done = run.reply.feed(token)
        except Exception as err:  # e.g. a tokenizer that cannot decode: this request fails, not the batch
            return self._finish(run, _failure(err))
        if done:
            self._finish(run)

    def _run_alone(self, run: Running) -> None:
        """Speculative decoding (the MTP draft is batch 1): the whole request now, one sequence at a time."""
        r, seq = run.job.request, run.sequence
        idx = torch.tensor([r.prompt_ids], dtype=torch.long, device=self.model.device)
        options = {"temperature": r.temperature, "top_p": r.top_p, "generator": seq.generator}
        tokens, verdict = token_stream(self.model, idx, r.max_tokens, speculative=True, **options), None
        try:
            for token in tokens:
                if not run.first_token:
                    self._first_token(run)
                if run.reply.feed(int(token[0, 0])) or (verdict := self._verdict(run.job)) is not None:
                    break
        except Exception as err:
            verdict = _failure(err)
        finally:
            tokens.close()
        self._finish(run, verdict)

    def _finish(self, run: Running, verdict: tuple[str, Any] | None = None) -> None:
        """Free `run`'s row and answer its job: its result, or the verdict's error."""
        if self._running.pop(run.sequence, None) is not None:
            self.decoder.leave(run.sequence)
        if verdict is None or verdict[0] == "done":
            now = time.perf_counter()
            result = run.reply.result()
            decoding = now - run.first_token if run.first_token else 0.0
            self.metrics.generation(result.prompt_tokens, result.completion_tokens, now - run.joined, decoding)
            verdict = ("done", result)
        self._end(run.job, verdict)
        self._report_batch()

    def _end(self, job: Job, event: tuple[str, Any]) -> None:
        job.send(event)
        with self._cv:
            self._pending -= 1
            self.metrics.set_queue_depth(self._pending)
            self._cv.notify_all()

    def _report_batch(self) -> None:
        tokens = sum(s.length for s in self._running)
        self.metrics.set_batch(len(self._running), tokens * self.cache_bytes_per_token)
