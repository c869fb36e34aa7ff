"""An OpenAI-compatible HTTP server for a causal LM, with continuous batching.

Read top-down: configuration -> a request's life as a `Job` (its events flow back to the
HTTP handler) -> the `Scheduler`, a thread that runs one decode step at a time over the
running batch and admits waiting jobs between steps (continuous batching) -> the HTTP API
(FastAPI: `/v1/models`, `/v1/completions`, `/v1/chat/completions` with server-sent-event
streaming, `/health`, `/metrics`; every error in OpenAI's shape) -> running it (uvicorn in
the foreground, or in a background thread for notebooks and tests) -> `iter_sse`, the
client side of streaming.

Limits, each with its status code: 400 for bad JSON or schema, a prompt longer than the
context, `max_tokens` < 1 or above the cap; 401 for a wrong API key (when one is set); 404
for an unknown model; 408 when a request outlives its deadline; 429 when the queue is full.
A client that disconnects mid-stream cancels its generation. Binds 127.0.0.1 by default.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Iterable, Iterator, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.generate import Decoder, KVCache, SamplingParams, TextStream, sample

if TYPE_CHECKING:
    import transformers

# ----------------------------------------------------------------------------------------
# Configuration


@dataclass
class ServerConfig:
    """What the server serves and its limits."""

    model_name: str = "smollm2-135m-instruct"  # the id clients send as "model" (an asset name)
    max_batch: int = 8  # sequences decoded together in one step
    max_queue: int = 32  # requests waiting for a batch slot; one more gets 429
    max_tokens: int = 512  # cap on a request's max_tokens
    timeout_s: float = 60.0  # deadline of a request, from arrival to its last token
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer <key>"

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive int, got {value!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"ServerConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServerConfig.api_key must be None or a non-empty string")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFull(APIError):
    """The waiting queue is at its limit: 429, try again later."""

    def __init__(self, limit: int):
        super().__init__(429, f"The server is busy ({limit} requests already waiting); retry shortly.",
                         "rate_limit_error", None, "queue_full")


# ----------------------------------------------------------------------------------------
# A request's life: a Job, its events read by the HTTP handler


@dataclass
class Job:
    """One generation request inside the server; the scheduler thread fills `events`."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    eos: tuple[int, ...]
    deadline: float  # time.monotonic() after which the job is abandoned
    loop: asyncio.AbstractEventLoop  # the HTTP server's loop, where `events` lives
    seed: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the handler when the client goes away
    completion_tokens: int = 0

    def emit(self, kind: str, payload: Any) -> None:
        """Send ("text", str) | ("done", finish_reason) | ("error", APIError) to the handler (thread-safe)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def cancel(self) -> None:
        """Ask the scheduler to stop this job (a no-op once it is done)."""
        self.cancelled = True


class Metrics:
    """Counters of the server, read by /metrics; updated under a lock from both threads."""

    WINDOW_S = 10.0  # tokens/s is measured over the last WINDOW_S seconds

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.counts = collections.Counter()
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def add(self, name: str, n: int = 1) -> None:
        """counts[name] += n."""
        with self.lock:
            self.counts[name] += n

    def tokens(self, n: int) -> None:
        """Record n generated tokens now."""
        now = time.monotonic()
        with self.lock:
            self.counts["completion_tokens"] += n
            self.recent.append((now, n))

    def snapshot(self, queue_depth: int, running: int) -> dict:
        """The counters, the queue depth, the running batch size and recent tokens/s."""
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW_S:
                self.recent.popleft()
            window = min(self.WINDOW_S, now - self.started)
            rate = sum(n for _, n in self.recent) / window if window > 0 else 0.0
            counts = dict(self.counts)
        names = ("requests", "completed", "cancelled", "timed_out", "rejected", "prompt_tokens", "completion_tokens",
                 "decode_steps")
        return {**{n: counts.get(n, 0) for n in names}, "queue_depth": queue_depth, "running": running,
                "tokens_per_second": round(rate, 2), "uptime_s": round(now - self.started, 1)}


# ----------------------------------------------------------------------------------------
# The scheduler: continuous batching


@dataclass
class _Row:
    """A running job: one row of the batch and its decoding state."""

    job: Job
    text: TextStream
    generator: torch.Generator | None
    context: torch.Tensor  # (L,) prompt + generated ids, for the repetition penalty
    last: int = 0  # the id to feed at the next step


class Scheduler:
    """Runs generation in one thread: a decode step over the running batch, then admits waiting jobs.

    Continuous batching: a new job does not wait for the batch to finish. Between two steps
    it is prefilled alone, its KV cache left-padded and stacked onto the batch's
    (`KVCache.cat`), and from the next step on it decodes with the others; a finished or
    cancelled job leaves the batch (`KVCache.select`) at once. Each step reads the weights
    once for the whole batch, which is why throughput grows with the batch.
    """

    def __init__(self, model: Any, tokenizer: "transformers.PreTrainedTokenizerBase", config: ServerConfig):
        self.decoder = Decoder(model)
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = Metrics()
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[_Row] = []
        self.cache: KVCache | None = None
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # -- the HTTP side --------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; raise QueueFull when max_queue jobs are already waiting."""
        with self.wake:
            if len(self.waiting) >= self.config.max_queue:
                self.metrics.add("rejected")
                raise QueueFull(self.config.max_queue)
            self.waiting.append(job)
            self.metrics.add("requests")
            self.metrics.add("prompt_tokens", len(job.prompt_ids))
            self.wake.notify()

    def stats(self) -> dict:
        """The metrics with the current queue depth and batch size."""
        return self.metrics.snapshot(len(self.waiting), len(self.running))

    def start(self) -> None:
        """Start the generation thread."""
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="llmlab-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step; waiting and running jobs get an error."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()
        shutdown = APIError(503, "The server is shutting down.", "server_error", None, "shutdown")
        for job in self.waiting:
            job.emit("error", shutdown)
        self.waiting.clear()
        self._fail_all(shutdown)

    # -- the generation thread ----------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.running:
                        self.wake.wait()
                    if self.stopping:
                        return
                try:
                    self._admit()
                    if self.running:
                        self._step()
                except Exception as e:  # noqa: BLE001 — fail the batch, keep serving
                    self._fail_all(APIError(500, f"Generation failed: {type(e).__name__}: {e}", "server_error"))

    def _fail_all(self, error: APIError) -> None:
        """End every running job with `error` and start from an empty batch."""
        for row in self.running:
            row.job.emit("error", error)
        self.running, self.cache = [], None

    def _admit(self) -> None:
        """Prefill waiting jobs into free batch slots."""
        while len(self.running) < self.config.max_batch:
            with self.wake:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if self._abandoned(job):
                continue
            try:
                self._prefill(job)
            except Exception as e:  # noqa: BLE001 — this job fails, the batch goes on
                job.emit("error", APIError(500, f"Generation failed: {type(e).__name__}: {e}", "server_error"))

    def _prefill(self, job: Job) -> None:
        """Run the job's prompt alone, draw its first token, and stack its cache onto the batch's."""
        cache = KVCache()
        ids = torch.tensor([job.prompt_ids], device=self.decoder.device)
        logits = self.decoder.forward(ids, cache)[0, -1]  # (V,)
        generator = None if job.seed is None else torch.Generator().manual_seed(job.seed & (2**64 - 1))
        row = _Row(job, TextStream(self.tokenizer, job.stop), generator, ids[0])
        if self._advance(row, logits):
            return  # finished with its first token
        self.cache = cache if not self.running else KVCache.cat([self.cache, cache])
        self.running.append(row)

    def _step(self) -> None:
        """One decode step for the whole batch; finished and abandoned jobs leave it."""
        keep = [i for i, row in enumerate(self.running) if not self._abandoned(row.job)]
        self._keep(keep)
        if not self.running:
            return
        last = torch.tensor([[row.last] for row in self.running], device=self.decoder.device)  # (B, 1)
        logits = self.decoder.forward(last, self.cache)[:, -1]  # (B, V)
        self.metrics.add("decode_steps")
        keep = [i for i, row in enumerate(self.running) if not self._advance(row, logits[i])]
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.running):
            return
        self.running = [self.running[i] for i in rows]
        if self.running:
            self.cache.select(rows)
        else:
            self.cache = None

    def _abandoned(self, job: Job) -> bool:
        """True (and counted, and told) when a job was cancelled or is past its deadline."""
        if job.cancelled:
            self.metrics.add("cancelled")
            return True
        if time.monotonic() > job.deadline:
            self.metrics.add("timed_out")
            job.emit("error", APIError(408, f"The request did not finish within {self.config.timeout_s:g} s "
                                            f"({job.completion_tokens} tokens generated).",
                                       "timeout_error", None, "deadline_exceeded"))
            return True
        return False

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Draw the row's next token from logits (V,) and send its text; True when the job is done."""
        job = row.job
        token = int(sample(logits[None], job.sampling, row.generator, row.context[None],
                           job.completion_tokens, job.eos)[0])
        job.completion_tokens += 1
        self.metrics.tokens(1)
        row.context = torch.cat([row.context, torch.tensor([token], device=row.context.device)])
        row.last = token
        finish = None
        if token in job.eos:
            finish = "stop"
        else:
            if delta := row.text.push(token):
                job.emit("text", delta)
            if row.text.stopped:
                finish = "stop"
            elif job.completion_tokens >= job.max_tokens:
                finish = "length"
        if finish is None:
            return False
        if tail := row.text.finish():
            job.emit("text", tail)
        job.emit("done", finish)
        self.metrics.add("completed")
        return True


# ----------------------------------------------------------------------------------------
# The HTTP API: schemas


class _GenerationFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's names; top_k and the penalties as in vLLM)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the model id, as listed by /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (capped by the server)")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    length_penalty: float = Field(0.0, ge=-10, le=10, allow_inf_nan=False)
    stop: Annotated[str, Field(min_length=1)] | Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    user: str | None = None


class CompletionRequest(_GenerationFields):
    """POST /v1/completions: continue a text."""

    prompt: str


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions: the assistant's next turn, the conversation formatted by the chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "bad JSON or schema, prompt beyond the context, bad max_tokens"), (401, "missing or wrong API key"),
    (404, "unknown model"), (408, "deadline exceeded"), (429, "queue full"))}


# ----------------------------------------------------------------------------------------
# The HTTP API: the app


def _error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 details -> one OpenAI-style 400 naming the first bad field."""
    errors = exc.errors() or [{"type": "", "loc": (), "msg": "invalid request"}]
    if errors[0]["type"] == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: expected a JSON object.",
                        code="invalid_json")
    param = _param(errors[0].get("loc", ()))
    # A union (e.g. stop: str | list[str]) reports one error per alternative; a type
    # mismatch is the least informative of them.
    same = [e for e in errors if _param(e.get("loc", ())) == param]
    first = next((e for e in same if not e["type"].endswith("_type")), same[0])
    if first["type"] == "missing" and param:
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if not param:
        return APIError(400, f"The request body must be a JSON object ({first['msg']}).", code="invalid_body")
    return APIError(400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value")


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages.0.role'; stops at pydantic's union labels ('constrained-str')."""
    parts = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if not (isinstance(part, int) or part.isidentifier()):
            break
        parts.append(str(part))
    return ".".join(parts) or None


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


class _EventStream(StreamingResponse):
    """A server-sent-event response that cancels its job however the response ends (disconnects included)."""

    def __init__(self, job: Job, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # a no-op when the job has finished


def create_app(model: Any, tokenizer: "transformers.PreTrainedTokenizerBase",
               config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a course GPT or a Hugging Face causal LM) under config.model_name."""
    config = config or ServerConfig()
    scheduler = Scheduler(model, tokenizer, config)
    context = scheduler.decoder.max_length
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
    if config.api_key:
        app.add_middleware(_RequireKey, api_key=config.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"Internal error: {type(exc).__name__}", "server_error"))

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
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "llmlab", "max_model_len": context}]}

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue `prompt` (streamed as server-sent events with stream=true)."""
        ids = tokenizer(body.prompt)["input_ids"]
        return await _generate(body, ids, chat=False, request=request)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """The assistant's reply to `messages` (streamed as server-sent events with stream=true)."""
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        except Exception as e:  # noqa: BLE001 — a template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"The chat template rejected these messages: {e}", param="messages") from None
        return await _generate(body, ids, chat=True, request=request)

    async def _generate(body: _GenerationFields, ids: list[int], chat: bool, request: Request) -> Any:
        if body.model != config.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                                f"'{config.model_name}'.", param="model", code="model_not_found")
        if not ids:
            raise APIError(400, "The prompt is empty: give at least one token.", param="prompt", code="invalid_value")
        room = context - len(ids)
        max_tokens = body.max_tokens
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, as much as fits for chat
            max_tokens = min(16 if not chat else config.max_tokens, max(room, 1))
        if max_tokens > config.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {config.max_tokens}.",
                           param="max_tokens", code="invalid_value")
        if len(ids) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). Please "
                                "reduce the length of the prompt or max_tokens.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                  repetition_penalty=body.repetition_penalty, length_penalty=body.length_penalty)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        job = Job(ids, max_tokens, sampling, stop, stop_ids, time.monotonic() + config.timeout_s,
                  asyncio.get_running_loop(), seed=body.seed)
        scheduler.submit(job)
        reply = _Reply(config.model_name, chat, len(ids))
        if body.stream:
            return _EventStream(job, _sse(job, reply))
        return await _collect(job, reply, request)

    def openapi() -> dict:
        """FastAPI's schema, plus what this server accepts: its model id and its max_tokens cap."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                fields = schema["components"]["schemas"][name]["properties"]
                fields["model"]["enum"] = [config.model_name]
                for option in fields["max_tokens"]["anyOf"]:
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


class _Reply:
    """Builds OpenAI's response objects for one request."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        """One streamed piece."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return self._envelope("chat.completion.chunk", {"index": 0, "delta": delta, "finish_reason": finish_reason})
        return self._envelope("text_completion", {"index": 0, "text": text or "", "logprobs": None,
                                                   "finish_reason": finish_reason})

    def full(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        """The whole answer at once."""
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": self.prompt_tokens + completion_tokens}
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            return {**self._envelope("chat.completion", choice), "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope("text_completion", choice), "usage": usage}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _sse(job: Job, reply: _Reply) -> AsyncIterator[str]:
    """The job's events as server-sent events, ending with `data: [DONE]`."""
    if reply.chat:
        yield _event(reply.chunk(None, role=True))
    while True:
        kind, payload = await job.events.get()
        if kind == "text":
            yield _event(reply.chunk(payload))
        elif kind == "done":
            yield _event(reply.chunk(None, payload))
            yield "data: [DONE]\n\n"
            return
        else:
            yield _event(payload.body())
            return


async def _collect(job: Job, reply: _Reply, request: Request) -> JSONResponse:
    """Wait for the whole answer, cancelling the job if the client disconnects meanwhile."""
    parts = []
    while True:
        try:
            kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return JSONResponse({}, status_code=499)  # nobody is listening
            continue
        if kind == "text":
            parts.append(payload)
        elif kind == "done":
            return JSONResponse(reply.full("".join(parts), payload, job.completion_tokens))
        else:
            return _error_response(payload)


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


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load config.model_name and serve it with uvicorn until interrupted (the `llmlab serve` command)."""
    import uvicorn

    model, tokenizer = load(config.model_name)
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

