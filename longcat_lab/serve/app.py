"""The FastAPI application of `longcat-lab serve` (docs/design.md §7.2): the OpenAI chat-completions API over an
`Engine`, plus `/health` and Prometheus `/metrics`.

The engine may be built after the server starts (`load`): until it is ready `/health` answers 503 ("loading") and
completions 503, so a load balancer sends no traffic to a server that is still reading its checkpoint. On shutdown
(Ctrl-C, SIGTERM) the engine drains before uvicorn closes its connections: no new requests (503), the running ones
finish for up to the grace period while their streams stay open, the rest are cancelled with an error, and the
server prints how many of each.

Errors use the OpenAI body, `{"error": {"message", "type", "param", "code"}}`, so the official client raises its
usual exceptions: 400 for a request the server refuses, 404 for another model's name, 503 when the queue is full,
500 when generation itself fails, 504 past the request timeout (the server is loading or shutting down: 503).
Streams are server-sent events: `data: {chunk}` lines and a final `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from longcat_lab.serve.engine import BadRequest, Engine, QueueFull, Result, new_id, tool_calls_json
from longcat_lab.serve.limits import Limits, check_prompt, read_body, receive_body, reply_content
from longcat_lab.serve.metrics import Metrics

COMPLETIONS = "/v1/chat/completions"
PATHS = ("/health", "/metrics", "/v1/models", COMPLETIONS)


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kinds = {404: "not_found_error", 503: "server_busy", 500: "server_error", 504: "timeout", 413: "request_too_large"}
    kind = kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def usage(result: Result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def create_app(
    engine: Engine | None = None,
    *,
    load: Callable[[], Engine] | None = None,
    metrics: Metrics | None = None,
    shutdown_grace: float = 30.0,
    limits: Limits | None = None,
) -> FastAPI:
    """The application serving `engine`, or the engine `load()` builds in a thread once the server is up (`metrics`:
    the one that engine will use, so /metrics answers while it loads), under `limits` (`serve.limits`). On shutdown
    the engine drains for up to `shutdown_grace` seconds (`drain`)."""
    if (engine is None) == (load is None):
        raise ValueError("create_app needs exactly one of engine= or load=")
    metrics = engine.metrics if engine is not None else metrics or Metrics()
    holder = {"engine": engine, "failed": None}
    limits = limits or Limits()

    def build() -> None:
        try:
            holder["engine"] = load()
        except Exception as err:  # the server stays up and says why on /health
            holder["failed"] = f"{type(err).__name__}: {err}"
            print(f"[longcat-lab] loading the model failed: {holder['failed']}", flush=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if load is not None:
            threading.Thread(target=build, name="longcat-serve-load", daemon=True).start()
        yield
        drain(app)  # a no-op if the server's shutdown drained already

    app = FastAPI(
        title="longcat-lab",
        description="OpenAI-compatible chat completions for a longcat_lab checkpoint",
        lifespan=lifespan,
    )
    app.state.engine_holder, app.state.shutdown_grace, app.state.drained = holder, shutdown_grace, False

    def not_ready() -> JSONResponse | None:
        if holder["engine"] is not None:
            return None
        why = f"loading the model failed: {holder['failed']}" if holder["failed"] else "the model is loading"
        return error(503, why)

    @app.middleware("http")
    async def count(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception as err:  # a bug: one 500 without a traceback, counted, and the connection kept alive
            logging.getLogger(__name__).exception("request to %s failed", request.url.path)
            response = error(500, f"internal server error ({type(err).__name__})")
        path = request.url.path if request.url.path in PATHS else "other"  # bounded label values
        metrics.request(path, response.status_code)
        return response

    @app.get("/health")
    async def health():
        if holder["engine"] is None:
            status = "failed" if holder["failed"] else "loading"
            return JSONResponse({"status": status, "error": holder["failed"]}, 503)
        engine = holder["engine"]
        return {
            "status": "ok",
            "model": engine.name,
            "queue_depth": metrics.queue_depth,
            "batch_size": metrics.batch_size,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        if (refusal := not_ready()) is not None:
            return refusal
        engine = holder["engine"]
        model = {"id": engine.name, "object": "model", "created": int(metrics.started), "owned_by": "longcat-lab"}
        return {"object": "list", "data": [model]}

    @app.post(COMPLETIONS)
    async def chat_completions(request: Request):
        start = time.perf_counter()
        if (refusal := not_ready()) is not None:
            return refusal
        engine = holder["engine"]
        try:
            req = engine.parse(read_body(await receive_body(request.stream(), limits), limits))
            check_prompt(len(req.prompt_ids), limits)
        except BadRequest as err:
            return error(err.status, str(err), err.param)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = engine.submit(req, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except QueueFull as err:
            return error(503, str(err))
        cid, created = new_id("chatcmpl"), int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name}
            return f"data: {json.dumps({**body, 'choices': [choice]}, ensure_ascii=False)}\n\n"

        async def stream():
            streamed = ""
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "delta":
                        streamed += value
                        yield chunk({"content": value})
                    elif kind == "error":
                        status, message = value
                        body = error(status, message).body.decode()
                        yield f"data: {body}\n\n"
                        break
                    else:
                        content = reply_content(value.text, req.tools)  # what was held back after a call
                        if content.startswith(streamed) and content[len(streamed) :].strip():
                            yield chunk({"content": content[len(streamed) :]})
                        calls = tool_calls_json(value.tool_calls)
                        if calls:
                            yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                        yield chunk({}, value.finish_reason)
                        if req.include_usage:
                            tail = {"id": cid, "object": "chat.completion.chunk", "created": created}
                            tail |= {"model": engine.name, "choices": [], "usage": usage(value)}
                            yield f"data: {json.dumps(tail)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: the worker stops at its next token
                job.cancel()
                metrics.latency(time.perf_counter() - start)

        if req.stream:
            return StreamingResponse(stream(), media_type="text/event-stream")
        # The body is read, so the next ASGI message is the client's disconnect: nobody waits for the reply then.
        gone = asyncio.ensure_future(request.receive())
        try:
            kind = "delta"
            while kind == "delta":
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    job.cancel()  # the scheduler frees the row at its next step
                    metrics.latency(time.perf_counter() - start)
                    return error(499, "the client closed the connection")
                kind, value = get.result()
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            gone.cancel()
        metrics.latency(time.perf_counter() - start)
        if kind == "error":
            return error(*value)
        calls = tool_calls_json(value.tool_calls)
        content = reply_content(value.text, req.tools).strip() if req.tools else value.content
        message = {"role": "assistant", "content": content if (content or not calls) else None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": value.finish_reason}
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": engine.name,
            "choices": [choice],
            "usage": usage(value),
        }

    return app


def drain(app: FastAPI) -> tuple[int, int] | None:
    """Shut the app's engine down gracefully (`Engine.shutdown` with the app's grace period), once, and say how it
    went; returns (finished, cancelled), or None if there was no engine or it was drained already."""
    engine = app.state.engine_holder["engine"]
    if engine is None or app.state.drained:
        return None
    app.state.drained = True
    grace = app.state.shutdown_grace
    print(f"[longcat-lab] shutting down: finishing running requests for up to {grace:g} s", flush=True)
    finished, cancelled = engine.shutdown(grace)
    print(f"[longcat-lab] shut down: {finished} requests finished, {cancelled} cancelled", flush=True)
    return finished, cancelled


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the engine (`drain`) while the event loop still serves the running streams, then
    closing connections as usual."""

    async def shutdown(self, sockets=None) -> None:
        app = self.config.app
        await asyncio.to_thread(drain, app)
        await super().shutdown(sockets)


def run_app(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` with uvicorn at host:port until Ctrl-C or SIGTERM, then drain (`drain`)."""
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


class BackgroundServer:
    """uvicorn serving `app` on a free localhost port in a daemon thread, for tests, benchmarks and notebooks:
    `url` is the OpenAI base URL (`.../v1`), `root` the server's; `stop()` shuts it down (draining the engine)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", timeout: float = 30.0):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        self.root = f"http://{host}:{port}"
        self.url = f"{self.root}/v1"
        self.server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="longcat-serve-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.root} within {timeout:g} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
