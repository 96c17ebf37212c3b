"""The serving engine (docs/design.md §7.2): a model and its tokenizer behind the OpenAI chat-completions checks
(`serve.request`) and the continuous-batching scheduler (`serve.scheduler`).

`Engine.parse` checks a request body and renders it with the chat template; `Engine.submit` queues it, and the
scheduler's worker thread decodes it together with the other running requests, streaming each token's text to its
request as it is decoded. `Engine.shutdown` drains: no new requests, the running ones finish within a grace period,
the rest are cancelled.

Nothing a model writes is executed: tool calls are parsed (`chat.parse_assistant`) and returned to the client, as
the OpenAI API does; running them is the client's business.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from longcat_lab._util import check_int
from longcat_lab.inference.structured import ToolCallDecoder
from longcat_lab.inference.text import reply_stop_ids
from longcat_lab.serve.metrics import Metrics
from longcat_lab.serve.request import BadRequest, ChatRequest, Result, parse_request
from longcat_lab.serve.scheduler import Job, QueueFull, Scheduler

DEFAULT_MAX_BATCH = 16  # sequences per decoding step; 1 is one request at a time
# Tokens one step may compute: the running sequences' next tokens plus the prompts prefilled before it. A long
# prompt stalls every running sequence while it is prefilled, so the budget caps how much joins at once.
DEFAULT_STEP_TOKENS = 2048


class Engine:
    """A model and its tokenizer behind a queue and the continuous-batching scheduler (`Scheduler`): at most
    `max_queue` requests waiting or running, `max_batch` of them decoding together (default `DEFAULT_MAX_BATCH`, 1
    when speculative), `step_tokens` the step's token budget, `request_timeout` seconds from arrival to the end."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        metrics: Metrics | None = None,
        max_queue: int = 64,
        speculative: bool = False,
        max_batch: int | None = None,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        request_timeout: float | None = None,
    ):
        check_int("max_queue", max_queue, 1)
        if max_batch is None:  # the MTP draft decodes one sequence at a time
            max_batch = 1 if speculative else DEFAULT_MAX_BATCH
        check_int("max_batch", max_batch, 1)
        check_int("step_tokens", step_tokens, 1)
        if request_timeout is not None and not (isinstance(request_timeout, (int, float)) and request_timeout > 0):
            raise ValueError(f"request_timeout={request_timeout!r} is not allowed: it must be a number of seconds > 0")
        if speculative and getattr(model, "mtp", None) is None:
            raise ValueError(
                "speculative=True is not allowed for a model without an MTP module (num_nextn_predict_layers=0)"
            )
        if speculative and max_batch != 1:
            raise ValueError(
                f"max_batch={max_batch} is not allowed with speculative=True: the MTP draft decodes one sequence at a "
                "time (max_batch=1)"
            )
        self.model, self.tokenizer, self.name, self.speculative = model, tokenizer, name, speculative
        self.metrics = metrics or Metrics()
        self.stop_ids = reply_stop_ids(tokenizer)
        # Built at the first request; stays None with speculative decoding (the MTP draft is not masked).
        self._decoder: ToolCallDecoder | None = None
        self._constrained = not speculative
        self.scheduler = Scheduler(
            model,
            tokenizer,
            self.stop_ids,
            self.metrics,
            max_batch=max_batch,
            step_tokens=step_tokens,
            max_queue=max_queue,
            request_timeout=request_timeout,
            speculative=speculative,
        )

    def parse(self, body: Any) -> ChatRequest:
        """Check an OpenAI chat-completions body; raise BadRequest naming the first field that is wrong."""
        return parse_request(body, self.name, self.tokenizer, self.model.config.max_position_embeddings, self.decoder())

    def decoder(self) -> ToolCallDecoder | None:
        """The constrained decoder for structured outputs; None with speculative decoding (its draft is not
        masked) or for a tokenizer without the chat markers."""
        if self._decoder is None and self._constrained:
            try:
                self._decoder = ToolCallDecoder(self.tokenizer, self.model.config.vocab_size)
            except ValueError:
                self._constrained = False
        return self._decoder

    def submit(self, request: ChatRequest, emit: Callable[[tuple[str, Any]], None]) -> Job:
        """Queue a request; `emit` is called from the worker thread with its events (`Job`). Raises QueueFull."""
        job = Job(request, emit)
        self.scheduler.submit(job)
        return job

    def shutdown(self, grace: float = 0.0) -> tuple[int, int]:
        """Drain (`Scheduler.shutdown`): returns how many of the requests present finished and how many were
        cancelled."""
        return self.scheduler.shutdown(grace)

    def close(self) -> None:
        """Stop at once, cancelling whatever is queued or running."""
        self.shutdown(0.0)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def tool_calls_json(calls: list[dict]) -> list[dict]:
    """Parsed calls as OpenAI `tool_calls`: an id each, arguments as a JSON string."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for c in calls
    ]


__all__ = ["BadRequest", "ChatRequest", "Engine", "Job", "QueueFull", "Result", "new_id", "tool_calls_json"]
