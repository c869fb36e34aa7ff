"""An OpenAI-compatible HTTP server for a causal LM, with continuous batching.

Read top-down: configuration -> the HTTP API (FastAPI: `/v1/models`, `/v1/models/{id}`,
`/v1/completions`, `/v1/chat/completions` with server-sent-event streaming, `/health`,
`/metrics`; every error in OpenAI's shape) -> streaming and collecting a request's events ->
running it (uvicorn in the foreground, or in a background thread for notebooks and tests) ->
`iter_sse`, the client side of streaming. The protocol (schemas, which fields are accepted,
response objects) is `llmlab.openai_api`; the engine (continuous batching with chunked
prefill) is `llmlab.scheduler`.

Limits, each with its status code: 400 for bad JSON or schema, a field this server does not
implement, a prompt longer than the context, `max_tokens` < 1 or above the cap; 401 for a
wrong API key (when one is set); 404 for an unknown model; 413 for a body over
`max_body_bytes`; 429 with Retry-After when the running batch and the queue are full (the
official client waits that long and retries: nothing was started); 504 with
`x-should-retry: false` when a request outlives its generation deadline (the wait in the queue
not counted; a retry would redo the whole job, so the client is told not to). A client that
disconnects mid-stream cancels its generation. Binds 127.0.0.1 by default. Tokenising runs in a
worker thread, so a big prompt never blocks the event loop (`/health`, the other streams).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.generate import SamplingParams
from llmlab.openai_api import (ERRORS, APIError, ChatCompletionRequest, CompletionRequest, Reply, check_fields,
                               validation_error)
from llmlab.scheduler import Job, Scheduler

if TYPE_CHECKING:
    import transformers

__all__ = ["APIError", "BackgroundServer", "ServerConfig", "create_app", "iter_sse", "load", "machine_defaults", "run"]

# ----------------------------------------------------------------------------------------
# Configuration


@dataclass
class ServerConfig:
    """What the server serves and its limits."""

    model_name: str = "smollm2-135m-instruct"  # the id clients send as "model" (an asset name)
    max_batch: int = 8  # sequences decoded together in one step (prefilling ones included)
    max_queue: int = 32  # requests waiting for a batch slot, beyond the batch; one more gets 429
    max_tokens: int = 512  # cap on a request's max_tokens
    timeout_s: float = 300.0  # generation deadline of a request, from the moment it gets a batch slot
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer <key>"
    prefill_chunk: int = 512  # most prompt tokens prefilled at once (less while others decode)
    chunked_prefill: bool = True  # False: a prompt is prefilled in one pass, the running streams wait for it
    max_body_bytes: int = 1 << 20  # a larger request body gets 413

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_tokens", "prefill_chunk", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive int, got {value!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"ServerConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServerConfig.api_key must be None or a non-empty string")


# ----------------------------------------------------------------------------------------
# The HTTP API


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


class _RequireKey:
    """ASGI middleware: /v1/* and /metrics need the API key (checked before the body is read)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                message = ("Incorrect API key provided." if given else
                           "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.")
                await _error_response(APIError(401, message, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _LimitBody:
    """ASGI middleware: a body over `limit` bytes gets 413 before it is parsed (Content-Length or counted)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"The request body is larger than this server's limit of {self.limit} bytes.",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _error_response(too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _error_response(too_large)(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnects

        await self.app(scope, replay, send)


class _EventStream(StreamingResponse):
    """A server-sent-event response that cancels its jobs however the response ends (disconnects included)."""

    def __init__(self, jobs: list[Job], content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.jobs = jobs

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancel()  # a no-op when the job has finished


def create_app(model: Any, tokenizer: "transformers.PreTrainedTokenizerBase",
               config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a course GPT or a Hugging Face causal LM) under config.model_name."""
    config = config or ServerConfig()
    scheduler = Scheduler(model, tokenizer, config)
    context = scheduler.decoder.max_length
    vocab = scheduler.decoder.vocab_size
    stop_ids = _stop_token_ids(model, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="llmlab OpenAI-compatible server", version="1.0", lifespan=lifespan)
    created = int(time.time())
    app.state.scheduler = scheduler
    app.add_middleware(_LimitBody, limit=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(_RequireKey, api_key=config.api_key)  # added last: runs first

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"Internal error: {type(exc).__name__}", "server_error"))

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "llmlab",
                "max_model_len": context}

    def unknown_model(name: str) -> APIError:
        return APIError(404, f"The model '{name}' does not exist; this server serves '{config.model_name}'.",
                        param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict:
        """Liveness: 200 while the server runs."""
        return {"status": "ok", "model": config.model_name}

    @app.get("/metrics", responses={401: ERRORS[401]})
    async def metrics() -> dict:
        """Requests, tokens, tokens/s, queue depth, running batch, cancellations and timeouts."""
        return scheduler.stats()

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models() -> dict:
        """The one model this server serves."""
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses={401: ERRORS[401], 404: ERRORS[404]})
    async def model_info(model_id: str) -> dict:
        """The model object of `model_id` (404 unless it is the one served)."""
        if model_id != config.model_name:
            raise unknown_model(model_id)
        return model_card()

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue `prompt` (one choice per prompt; streamed as server-sent events with stream=true)."""
        check_fields(body, chat=False)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or len(prompts) > config.max_batch:
            raise APIError(400, f"'prompt' must hold 1 to {config.max_batch} prompts, got {len(prompts)}.",
                           param="prompt", code="invalid_value")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await asyncio.to_thread(lambda: tokenizer(texts)["input_ids"]) if texts else [])
        ids = [list(p) if not isinstance(p, str) else list(next(encoded)) for p in prompts]
        if any(not (0 <= i < vocab) for p in ids for i in p):
            raise APIError(400, f"Token ids in 'prompt' must lie in [0, {vocab}).", param="prompt",
                           code="invalid_value")
        return await _generate(body, ids, chat=False, request=request)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """The assistant's reply to `messages` (streamed as server-sent events with stream=true)."""
        check_fields(body, chat=True)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]

        def encode() -> list[int]:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

        try:
            ids = await asyncio.to_thread(encode)
        except Exception as e:  # noqa: BLE001 — a template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"The chat template rejected these messages: {e}", param="messages") from None
        return await _generate(body, [ids], chat=True, request=request)

    def _max_tokens(body: Any, chat: bool, ids: list[int]) -> int:
        """The request's max_tokens, checked against the cap and the context."""
        name = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(body, name)
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, as much as fits for chat
            max_tokens = min(16 if not chat else config.max_tokens, max(context - len(ids), 1))
        if max_tokens > config.max_tokens:
            raise APIError(400, f"{name}={max_tokens} is above this server's limit of {config.max_tokens}.",
                           param=name, code="invalid_value")
        if len(ids) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). Please "
                                f"reduce the length of the prompt or {name}.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        return max_tokens

    async def _generate(body: Any, prompts: list[list[int]], chat: bool, request: Request) -> Any:
        if body.model != config.model_name:
            raise unknown_model(body.model)
        if any(not ids for ids in prompts):
            raise APIError(400, "The prompt is empty: give at least one token.", param="prompt", code="invalid_value")
        limits = [_max_tokens(body, chat, ids) for ids in prompts]
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not (key.isdigit() and int(key) < vocab):
                raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}.",
                               param="logit_bias", code="invalid_value")
            bias[int(key)] = value
        logprobs = ((body.top_logprobs or 0) if body.logprobs else None) if chat else body.logprobs
        sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                  repetition_penalty=body.repetition_penalty, length_penalty=body.length_penalty)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(ids, limit, sampling, stop, stop_ids, loop, events, index=i, seed=body.seed, logprobs=logprobs,
                    logit_bias=bias, frequency_penalty=body.frequency_penalty,
                    presence_penalty=body.presence_penalty) for i, (ids, limit) in enumerate(zip(prompts, limits))]
        scheduler.submit(jobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        reply = Reply(config.model_name, chat, sum(map(len, prompts)), tokenizer, logprobs, include_usage)
        if body.stream:
            return _EventStream(jobs, _sse(jobs, reply))
        return await _collect(jobs, reply, request)

    def openapi() -> dict:
        """FastAPI's schema, plus what this server accepts: its model id and its max_tokens cap."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                fields = schema["components"]["schemas"][name]["properties"]
                fields["model"]["enum"] = [config.model_name]
                for key in ("max_tokens", "max_completion_tokens"):
                    for option in fields.get(key, {}).get("anyOf", []):
                        if option.get("type") == "integer":
                            option["maximum"] = config.max_tokens
        return app.openapi_schema

    app.openapi = openapi
    return app


def _stop_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Ids that end a reply: the tokenizer's eos, the model's generation eos ids, and ChatML's end of turn."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return tuple(sorted(i for i in ids if i is not None))


# ----------------------------------------------------------------------------------------
# A request's events: streamed, or collected into one answer


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _sse(jobs: list[Job], reply: Reply) -> AsyncIterator[str]:
    """The jobs' events as server-sent events (a usage chunk last when asked), ending with `data: [DONE]`."""
    if reply.chat:
        yield _event(reply.chunk(0, None, role=True))
    done = 0
    while done < len(jobs):
        index, kind, payload = await jobs[0].events.get()
        if kind == "text":
            yield _event(reply.chunk(index, payload[0], payload[1]))
        elif kind == "done":
            done += 1
            yield _event(reply.chunk(index, None, payload[1], finish_reason=payload[0]))
        else:
            yield _event(payload.body())
            return
    if reply.include_usage:
        yield _event(reply.usage_chunk(sum(j.completion_tokens for j in jobs)))
    yield "data: [DONE]\n\n"


async def _collect(jobs: list[Job], reply: Reply, request: Request) -> JSONResponse:
    """Wait for the whole answer, cancelling the jobs if the client disconnects meanwhile."""
    texts: list[list[str]] = [[] for _ in jobs]
    logprobs: list[list] = [[] for _ in jobs]
    finish: dict[int, str] = {}
    while len(finish) < len(jobs):
        try:
            index, kind, payload = await asyncio.wait_for(jobs[0].events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                for job in jobs:
                    job.cancel()
                return JSONResponse({}, status_code=499)  # nobody is listening
            continue
        if kind == "error":
            for job in jobs:
                job.cancel()
            return _error_response(payload)
        if kind == "text":
            texts[index].append(payload[0])
        else:
            finish[index] = payload[0]
        logprobs[index].extend(payload[1])
    choices = [("".join(texts[i]), finish[i], logprobs[i]) for i in range(len(jobs))]
    return JSONResponse(reply.full(choices, sum(j.completion_tokens for j in jobs)))


# ----------------------------------------------------------------------------------------
# Running the server


def load(name: str, device: str | torch.device = "auto") -> tuple[Any, "transformers.PreTrainedTokenizerBase"]:
    """Load an asset (or hub id) as (causal LM in eval mode, tokenizer), float32 on `device` (auto: the best)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab import assets, runtime

    path = assets.resolve(name)
    device = runtime.pick_device(device) if isinstance(device, str) else device
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def machine_defaults() -> dict:
    """Limits chosen for this machine: threads, max_batch, max_queue, max_tokens, timeout_s.

    threads: the cores this process may use, halved when the machine is already busy (load
    average at start above half of them): torch's threads wait for each other at every matmul,
    so one thread that shares its core with another job slows every step. A GPU batches 32
    sequences where a CPU is compute-bound past 8, and answers sooner (the deadline).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores / 2
    gpu = torch.cuda.is_available()
    batch = 32 if gpu else 8
    return {"threads": max(1, cores // 2) if busy else cores, "max_batch": batch, "max_queue": 4 * batch,
            "max_tokens": 512, "timeout_s": 120.0 if gpu else 300.0}


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
        quantize: str | None = None) -> None:
    """Load config.model_name (weight-only int8/int4 with `quantize`) and serve it with uvicorn until interrupted."""
    import uvicorn

    from llmlab import runtime

    threads = runtime.set_threads(threads)
    model, tokenizer = load(config.model_name)
    if quantize:
        from llmlab.serve_quant import quantize_weights

        quantize_weights(model, quantize)
    print(f"llmlab serve: {config.model_name} ({quantize or 'float32'} weights), {threads} threads, "
          f"max_batch={config.max_batch}, max_queue={config.max_queue}, max_tokens={config.max_tokens}, "
          f"timeout={config.timeout_s:g} s", flush=True)
    uvicorn.run(create_app(model, tokenizer, config), host=host, port=port, log_level="info")


class BackgroundServer:
    """A uvicorn server in a daemon thread (for notebooks and tests); port 0 picks a free port.

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="llmlab-uvicorn", daemon=True)
        self.host = host

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        """Start serving; return once the socket accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (is the port in use?)")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321."""
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def stop(self) -> None:
        """Shut down (running requests end) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------
# The client side of streaming


def iter_sse(lines: Iterable[str]) -> Iterator[dict]:
    """Parse server-sent-event lines ("data: {...}") into their JSON payloads, up to "data: [DONE]".

    An error event ({"error": {...}}) is yielded like any other; blank lines and comments are skipped.
    """
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)

