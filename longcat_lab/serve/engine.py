"""The serving engine (docs/design.md §7.2): checks an OpenAI chat-completions request, renders it with the chat
template, and generates on one worker thread.

Queueing policy: one sequence at a time, in arrival order. Requests wait in a FIFO queue (at most `max_queue`
waiting or running; one more is refused, and the server answers 503) and the worker runs them one after another,
streaming each token's text to its request as it is decoded. A client that disconnects cancels its generation at
the next token. Batching several requests into one forward is not done: with MoE routing and prompts of different
lengths it needs padding-aware caches, and on the CPUs this lab targets a batch of small matmuls gains little.

Nothing a model writes is executed: tool calls are parsed (`chat.parse_assistant`) and returned to the client, as
the OpenAI API does; running them is the client's business.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from longcat_lab.chat import encode_chat, parse_assistant, render
from longcat_lab.chat.template import TOOL_CALL_OPEN, ChatFormatError
from longcat_lab.inference.text import TextStream, reply_stop_ids, token_stream
from longcat_lab.serve.metrics import Metrics

MAX_STOP = 4  # as the OpenAI API


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400, or `status`), with a message naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class QueueFull(RuntimeError):
    """The queue holds `max_queue` requests already (HTTP 503)."""


@dataclass
class ChatRequest:
    """A checked request: the prompt's token ids and the sampling settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    tools: list[dict] | None
    stream: bool
    include_usage: bool


@dataclass
class Result:
    """A finished generation: the raw text, its parsed content and tool calls, why it ended, token counts."""

    text: str
    content: str
    tool_calls: list[dict]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    request: ChatRequest
    emit: Callable[[tuple[str, Any]], None]  # ("delta", text), then ("done", Result) or ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v) and v <= high
    if not ok:
        side = "(" if low_open else "["
        raise BadRequest(f"{name}={v!r} is not allowed: it must be a number in {side}{low:g}, {high:g}]", name)
    return float(v)


def _text_content(content: Any, i: int) -> str | None:
    """A message's content as a string: a string, None, or OpenAI's list of text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # text parts: {"type": "text", "text": ...}
    raise BadRequest(f"messages[{i}].content is not allowed: it must be a string or a list of text parts", "messages")


def _messages(raw: Any) -> list[dict]:
    """OpenAI messages in the form `chat.render` takes: text content, call arguments as objects."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages is not allowed: it must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}]={m!r} is not allowed: each message must be an object", "messages")
        msg = {"role": m.get("role"), "content": _text_content(m.get("content"), i)}
        if msg["content"] is None and not (m.get("role") == "assistant" and m.get("tool_calls")):
            raise BadRequest(f"messages[{i}].content is missing: only an assistant message with tool_calls may omit it")
        calls = []
        for j, call in enumerate(m.get("tool_calls") or []):
            f = call.get("function") if isinstance(call, dict) else None
            args = f.get("arguments") if isinstance(f, dict) else None
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                args = None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(args, dict):
                raise BadRequest(
                    f"messages[{i}].tool_calls[{j}] is not allowed: it needs function.name and function.arguments, "
                    "a JSON object (or a string holding one)",
                    "messages",
                )
            calls.append({"type": "function", "function": {"name": f["name"], "arguments": args}})
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _stop(raw: Any) -> list[str]:
    stop = [raw] if isinstance(raw, str) else (raw or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"stop={raw!r} is not allowed: it must be a string or a list of up to 4 non-empty strings")
    return stop


class Engine:
    """A model and its tokenizer behind a FIFO queue and one generation thread."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        metrics: Metrics | None = None,
        max_queue: int = 64,
        speculative: bool = False,
    ):
        if speculative and getattr(model, "mtp", None) is None:
            raise ValueError(
                "speculative=True is not allowed for a model without an MTP module (num_nextn_predict_layers=0)"
            )
        self.model, self.tokenizer, self.name, self.speculative = model, tokenizer, name, speculative
        self.metrics = metrics or Metrics()
        self.max_queue = max_queue
        self.stop_ids = reply_stop_ids(tokenizer)
        c = model.config
        # The latent cache per token: [c_KV ; k_R] in every attention block (docs/design.md §1.2).
        dtype_size = model.lm_head.weight.element_size()
        self.cache_bytes_per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * 2 * c.num_layers * dtype_size
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="longcat-serve-worker", daemon=True)
        self._worker.start()

    # Requests -----------------------------------------------------------------------------------------------
    def parse(self, body: Any) -> ChatRequest:
        """Check an OpenAI chat-completions body; raise BadRequest naming the first field that is wrong."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise BadRequest(
                f"model={body.get('model')!r} is not allowed: name the served model, {self.name!r}", "model"
            )
        if body["model"] != self.name:
            raise BadRequest(
                f"model={body.get('model')!r} is not served here: this server serves {self.name!r}", "model", 404
            )
        if body.get("n", 1) != 1:
            raise BadRequest(f"n={body.get('n')!r} is not allowed: this server returns one choice (n=1)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise BadRequest(f"{name}={body.get(name)!r} is not supported: only 0", name)
        if body.get("logprobs"):
            raise BadRequest("logprobs=true is not supported", "logprobs")
        tools = body.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise BadRequest("tools is not allowed: it must be a list of function tools", "tools")
        choice = body.get("tool_choice")
        if choice not in (None, "auto", "none"):
            raise BadRequest(f"tool_choice={choice!r} is not supported: only 'auto' or 'none'", "tool_choice")
        tools = None if choice == "none" else (tools or None)
        try:
            prompt = render(_messages(body.get("messages")), tools)
        except ChatFormatError as err:
            raise BadRequest(str(err), "messages" if "messages" in str(err) else "tools") from None
        ids = encode_chat(self.tokenizer, prompt).ids  # only the template's markers are special tokens
        room = self.model.config.max_position_embeddings - len(ids)
        if room < 1:
            raise BadRequest(
                f"the prompt is {len(ids)} tokens: the model's context is "
                f"{self.model.config.max_position_embeddings}; shorten the conversation",
                "messages",
            )
        raw_max = body.get("max_completion_tokens", body.get("max_tokens"))
        if raw_max is None:
            max_tokens = room
        elif isinstance(raw_max, int) and not isinstance(raw_max, bool) and 1 <= raw_max <= room:
            max_tokens = raw_max
        else:
            raise BadRequest(
                f"max_tokens={raw_max!r} is not allowed: it must be an integer in [1, {room}] (the context left after "
                f"the {len(ids)}-token prompt)",
                "max_tokens",
            )
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise BadRequest(f"seed={seed!r} is not allowed: it must be an integer in [0, 2**63)", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream={stream!r} is not allowed: it must be true or false", "stream")
        options = body.get("stream_options") or {}
        return ChatRequest(
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            seed=seed,
            stop=_stop(body.get("stop")),
            tools=tools,
            stream=stream,
            include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        )

    def submit(self, request: ChatRequest, emit: Callable[[tuple[str, Any]], None]) -> Job:
        """Queue a request; `emit` is called from the worker thread with its events. Raises QueueFull."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"the server is busy: {self._pending} requests are queued (max_queue={self.max_queue})")
            self._pending += 1
            self.metrics.set_queue_depth(self._pending)
        job = Job(request, emit)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        self._jobs.put(None)

    # The worker ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if not job.cancelled.is_set():
                    job.emit(("done", self._generate(job)))
            except Exception as err:  # a bug or an out-of-memory must fail this request, not the worker
                job.emit(("error", f"generation failed: {type(err).__name__}: {err}"))
            finally:
                self.metrics.set_cache_bytes(0)
                with self._lock:
                    self._pending -= 1
                    self.metrics.set_queue_depth(self._pending)

    def tokens(self, idx: torch.Tensor, max_new_tokens: int, **options) -> Iterator[torch.Tensor]:
        """The new tokens of one request (`inference.text.token_stream`; one sequence at a time anyway, the queue,
        so the MTP draft applies when the engine is speculative)."""
        return token_stream(self.model, idx, max_new_tokens, speculative=self.speculative, **options)

    def _generate(self, job: Job) -> Result:
        r = job.request
        start = time.perf_counter()
        generator = torch.Generator(device=self.model.device).manual_seed(r.seed) if r.seed is not None else None
        idx = torch.tensor([r.prompt_ids], dtype=torch.long, device=self.model.device)
        options = {"temperature": r.temperature, "top_p": r.top_p, "generator": generator}
        decoded = TextStream(self.tokenizer, self.tokens(idx, r.max_tokens, **options), self.stop_ids)
        sent, text, cut = 0, "", -1
        holding = False  # once a tool call starts, its text is held back for the parser
        for complete in decoded:
            self.metrics.set_cache_bytes((len(r.prompt_ids) + len(decoded.ids)) * self.cache_bytes_per_token)
            if complete is None:  # a UTF-8 character split between tokens: wait for the rest
                continue
            text = complete
            cut = min((p for p in (text.find(s) for s in r.stop) if p >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
            if r.tools and TOOL_CALL_OPEN in text:
                holding = True
            # A stop string may be forming at the end of the text: keep back what could be its start.
            safe = len(text) if cut >= 0 else len(text) - _partial_stop(text, r.stop)
            if not holding and safe > sent:
                job.emit(("delta", text[sent:safe]))
                sent = safe
            if cut >= 0 or job.cancelled.is_set():
                break
        decoded.close()
        if cut < 0:  # the whole text, a last character still missing bytes included
            text = decoded.text
        if not holding and len(text) > sent:  # what was held back as a possible stop-string start
            job.emit(("delta", text[sent:]))
        seconds = time.perf_counter() - start
        out = decoded.ids
        self.metrics.generation(len(r.prompt_ids), len(out), seconds)
        finish = "stop" if decoded.stopped or cut >= 0 else "length"
        content, calls = text, []
        if r.tools:
            parsed = parse_assistant(text, r.tools)
            content, calls = parsed.content, parsed.tool_calls
            if calls:
                finish = "tool_calls"
        return Result(text, content, calls, finish, len(r.prompt_ids), len(out))


def _partial_stop(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin one of `stops`."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


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
