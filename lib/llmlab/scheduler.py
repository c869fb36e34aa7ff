"""The engine behind `llmlab.serve`: continuous batching with chunked prefill, in one thread.

Read top-down: a request's life as a `Job` (its events flow back to the HTTP handler) ->
`Metrics` -> the `Scheduler`, a thread whose every iteration (1) admits waiting jobs into free
batch slots, (2) plans one prefill pass: the next chunk of the oldest admitted prompt, or
several whole waiting prompts left-padded together (a burst of requests), and (3) runs one
decode step over the running batch, with that prefill in the same forward pass when the
decoder can (a Llama: `LlamaDecoder.next_logits_together`, the weights read once for both).
A long prompt therefore never freezes the others' streams: its prefill is cut into chunks
sized to cost about one decode step each (measured as it runs). The forward passes are
`llmlab.serve_model`'s: for a Llama, fused projections and the head on the last position only.

Admission counts every job the scheduler holds: `max_batch` running (prefilling included)
plus `max_queue` waiting; one more gets 429 with a Retry-After estimated from the recent
completion rate. A job's deadline (`timeout_s`) starts when it gets a batch slot: time in the
queue is not counted, and the error says how long the job waited and how long it ran.
"""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmlab.generate import KVCache, SamplingParams, TextStream, left_pad, sample
from llmlab.openai_api import APIError
from llmlab.serve_model import serving_decoder

if TYPE_CHECKING:
    import transformers

    from llmlab.serve import ServerConfig

NO_RETRY = {"x-should-retry": "false"}  # the official openai client obeys this header before the status


def queue_full(jobs: int, retry_after: int) -> APIError:
    """429: the running batch and the queue are full; Retry-After says when a slot is likely free."""
    return APIError(429, f"The server is busy (its batch and queue are full); retry in {retry_after} s.",
                    "rate_limit_error", None, "queue_full", {"Retry-After": str(retry_after)})


# ----------------------------------------------------------------------------------------
# A request's life: a Job, its events read by the HTTP handler


@dataclass
class Job:
    """One prompt to continue inside the server; the scheduler thread fills `events`."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    eos: tuple[int, ...]
    loop: asyncio.AbstractEventLoop  # the HTTP server's loop, where `events` lives
    events: asyncio.Queue  # (index, kind, payload), shared by the jobs of one request
    index: int = 0  # which choice of its request this job is
    seed: int | None = None
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k likeliest
    logit_bias: dict[int, float] = field(default_factory=dict)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    cancelled: bool = False  # set by the handler when the client goes away
    completion_tokens: int = 0
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None  # when it got a batch slot; its deadline counts from here
    first_token: float | None = None

    def emit(self, kind: str, payload: Any) -> None:
        """Send ("text", (str, logprobs)) | ("done", (finish_reason, logprobs)) | ("error", APIError) (thread-safe)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))

    def cancel(self) -> None:
        """Ask the scheduler to stop this job (a no-op once it is done)."""
        self.cancelled = True

    @property
    def plain(self) -> bool:
        """True when the next token needs nothing but the sampling parameters (batched argmax when greedy)."""
        return (self.logprobs is None and not self.logit_bias and not self.frequency_penalty
                and not self.presence_penalty and self.sampling.repetition_penalty == 1.0
                and not self.sampling.length_penalty)


class Metrics:
    """Counters of the server, read by /metrics; updated under a lock from both threads."""

    WINDOW_S = 10.0  # rates are measured over the last WINDOW_S seconds

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.counts = collections.Counter()
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self.finished: collections.deque[float] = collections.deque()  # times jobs left the batch

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

    def left_batch(self) -> None:
        """A job left the batch (done, cancelled or timed out): a slot freed now."""
        with self.lock:
            self.finished.append(time.monotonic())

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - self.WINDOW_S:
            self.recent.popleft()
        while self.finished and self.finished[0] < now - self.WINDOW_S:
            self.finished.popleft()

    def slots_per_second(self) -> float:
        """How fast batch slots freed over the window (0 when none did)."""
        now = time.monotonic()
        with self.lock:
            self._trim(now)
            return len(self.finished) / min(self.WINDOW_S, max(now - self.started, 1e-3))

    def snapshot(self, queue_depth: int, running: int) -> dict:
        """The counters, the queue depth, the running batch size and recent tokens/s."""
        now = time.monotonic()
        with self.lock:
            self._trim(now)
            window = min(self.WINDOW_S, now - self.started)
            rate = sum(n for _, n in self.recent) / window if window > 0 else 0.0
            counts = dict(self.counts)
        names = ("requests", "completed", "cancelled", "timed_out", "rejected", "prompt_tokens", "completion_tokens",
                 "decode_steps", "prefill_chunks")
        return {**{n: counts.get(n, 0) for n in names}, "queue_depth": queue_depth, "running": running,
                "tokens_per_second": round(rate, 2), "uptime_s": round(now - self.started, 1)}


# ----------------------------------------------------------------------------------------
# The scheduler


@dataclass
class _Row:
    """A job with a batch slot: its prefill progress, then its decoding state."""

    job: Job
    text: TextStream
    generator: torch.Generator | None
    cache: KVCache | None = field(default_factory=KVCache)  # its own, until its prefill is done
    prefilled: int = 0  # prompt tokens in `cache`
    generated: list[int] = field(default_factory=list)
    pending: list = field(default_factory=list)  # log-probabilities not yet sent with a text piece
    last: int = 0  # the id to feed at the next step


@dataclass
class _Prefill:
    """One planned prefill pass: whole prompts left-padded together, or the next chunk of one row's prompt."""

    rows: list[_Row]
    input_ids: torch.Tensor  # (k, T)
    attention_mask: torch.Tensor | None  # (k, T), or None: no padding
    cache: KVCache  # a new one for whole prompts; the row's own for a chunk
    whole: bool


class Scheduler:
    """Runs generation in one thread: admit, one prefill chunk and one decode step over the batch; repeat.

    Continuous batching: a new job does not wait for the batch to finish. Its prompt is
    prefilled chunk by chunk into a cache of its own, interleaved with the batch's decode
    steps; then its cache is left-padded and stacked onto the batch's (`KVCache.cat`), and it
    decodes with the others. A finished or cancelled job leaves the batch (`KVCache.select`)
    at once. Each step reads the weights once for the whole batch, which is why throughput
    grows with the batch.
    """

    def __init__(self, model: Any, tokenizer: "transformers.PreTrainedTokenizerBase", config: "ServerConfig"):
        self.decoder = serving_decoder(model)
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = Metrics()
        self.waiting: collections.deque[Job] = collections.deque()
        self.prefilling: list[_Row] = []
        self.running: list[_Row] = []
        self.cache: KVCache | None = None
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.outbox: list[tuple[Job, str, Any]] = []  # events of this step, delivered by _flush
        self.together = hasattr(self.decoder, "next_logits_together")  # prefill chunks ride on decode steps
        self.step_s = 0.0  # moving average of a decode step's seconds
        self.prefill_tps = 0.0  # moving average of prefill tokens/s

    # -- the HTTP side --------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); 429 when the batch plus the queue cannot hold them."""
        with self.wake:
            held = len(self.waiting) + len(self.prefilling) + len(self.running)
            if held + len(jobs) > self.config.max_batch + self.config.max_queue:
                self.metrics.add("rejected")
                raise queue_full(len(jobs), self._retry_after(held + len(jobs) - self.config.max_batch
                                                              - self.config.max_queue))
            self.waiting.extend(jobs)
            self.metrics.add("requests")
            self.metrics.add("prompt_tokens", sum(len(j.prompt_ids) for j in jobs))
            self.wake.notify()

    def _retry_after(self, slots: int) -> int:
        """Whole seconds until `slots` slots are likely free, from the recent rate; 1..60."""
        rate = self.metrics.slots_per_second()
        return max(1, min(60, math.ceil(slots / rate))) if rate > 0 else int(Metrics.WINDOW_S)

    def stats(self) -> dict:
        """The metrics with the current queue depth and batch size (prefilling jobs included)."""
        return self.metrics.snapshot(len(self.waiting), len(self.running) + len(self.prefilling))

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
                    while not self.stopping and not self.waiting and not self.running and not self.prefilling:
                        self.wake.wait()
                    if self.stopping:
                        return
                try:
                    self._admit()
                    plan = self._plan_prefill() if self.prefilling else None
                    if plan is not None and not (self.running and self.together):
                        self._prefill(plan)
                        plan = None
                    if self.running:
                        self._step(plan)
                    elif plan is not None:  # every running job was abandoned
                        self._prefill(plan)
                except Exception as e:  # noqa: BLE001 — fail the batch, keep serving
                    self._fail_all(_failed(e))
                self._flush()

    def _send(self, job: Job, kind: str, payload: Any) -> None:
        """Queue an event for the HTTP side; `_flush` hands a whole step's events over at once."""
        self.outbox.append((job, kind, payload))

    def _flush(self) -> None:
        """One wake-up of the event loop per step for all its events, not one per token."""
        if not self.outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, kind, payload in self.outbox:
            by_loop.setdefault(job.loop, []).append((job.events, (job.index, kind, payload)))
        self.outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, error: APIError) -> None:
        """End every running and prefilling job with `error` and start from an empty batch."""
        self._flush()
        for row in self.running + self.prefilling:
            row.job.emit("error", error)
        self.running, self.prefilling, self.cache = [], [], None

    def _admit(self) -> None:
        """Give waiting jobs the free batch slots; their deadlines start now."""
        while len(self.running) + len(self.prefilling) < self.config.max_batch:
            with self.wake:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancelled:
                self.metrics.add("cancelled")
                continue
            job.started = time.monotonic()
            generator = None if job.seed is None else torch.Generator().manual_seed(job.seed & (2**64 - 1))
            self.prefilling.append(_Row(job, TextStream(self.tokenizer, job.stop), generator))

    def _chunk_budget(self) -> int:
        """Prompt tokens one prefill pass may take: what costs about one decode step while others decode."""
        limit = self.config.prefill_chunk
        if self.running and self.step_s and self.prefill_tps:
            limit = min(limit, max(32, int(self.step_s * self.prefill_tps)))  # a floor: a forward has a fixed cost
        return limit

    def _burst_budget(self) -> int:
        """Prompt tokens of one pass over several whole waiting prompts (a burst of requests).

        k prompts that each wait for a chunk would stall the running streams for k chunks, one
        per decode step; in one pass the streams wait about as long in all, once, and the k
        joiners start decoding k - 1 steps sooner (measured on SmolLM2-135M: 8 clients arriving
        one by one were prefilled one per step, each step of the batch then counting fewer rows).
        So the budget is k chunks' worth, at most `prefill_chunk`.
        """
        if not self.config.chunked_prefill or not self.running:
            return self.config.prefill_chunk
        fresh = 0
        for r in self.prefilling:
            if r.prefilled or r.job.cancelled:
                break
            fresh += 1
        return min(self.config.prefill_chunk, max(1, fresh) * self._chunk_budget())

    def _chunk_size(self, row: _Row) -> int:
        """Prompt tokens of `row` for its next chunk (all that is left without chunked prefill)."""
        left = len(row.job.prompt_ids) - row.prefilled
        return min(left, self._chunk_budget()) if self.config.chunked_prefill else left

    def _plan_prefill(self) -> "_Prefill | None":
        """The next prefill pass: whole short prompts (a burst, within its budget), or one chunk of the oldest."""
        row = self.prefilling[0]
        if self._abandoned(row):
            self.prefilling.pop(0)
            self.metrics.left_batch()
            return None
        if row.prefilled == 0:
            budget, fits, total = self._burst_budget(), [], 0
            for r in self.prefilling:
                total += len(r.job.prompt_ids)
                if r.prefilled or r.job.cancelled or total > budget:
                    break
                fits.append(r)
            if fits:  # one or more whole prompts in one left-padded pass (held in `prefilling` until done)
                input_ids, attention_mask = left_pad([r.job.prompt_ids for r in fits])
                return _Prefill(fits, input_ids, attention_mask, KVCache(), whole=True)
        n = self._chunk_size(row)
        ids = torch.tensor([row.job.prompt_ids[row.prefilled:row.prefilled + n]])
        return _Prefill([row], ids, None, row.cache, whole=False)

    def _prefill(self, plan: "_Prefill") -> None:
        """Run a planned prefill pass on its own; a failure ends only its jobs."""
        start = time.perf_counter()
        try:
            logits = self.decoder.next_logits(plan.input_ids.to(self.decoder.device), plan.cache,
                                              plan.attention_mask)  # (k, V)
        except Exception as e:  # noqa: BLE001 — these jobs fail, the batch goes on
            self._drop_prefill(plan, _failed(e))
            return
        self._finish_prefill(plan, logits, time.perf_counter() - start)

    def _drop_prefill(self, plan: "_Prefill", error: APIError) -> None:
        for row in plan.rows:
            if row in self.prefilling:
                self.prefilling.remove(row)
            self._send(row.job, "error", error)

    def _finish_prefill(self, plan: "_Prefill", logits: torch.Tensor, seconds: float) -> None:
        """After a prefill pass (logits (k, V), its own seconds): rows whose prompt is done draw a token and join."""
        self.prefill_tps = _average(self.prefill_tps, plan.input_ids.numel() / max(seconds, 1e-6))
        self.metrics.add("prefill_chunks")
        if not plan.whole:
            row = plan.rows[0]
            row.prefilled += plan.input_ids.size(1)
            if row.prefilled < len(row.job.prompt_ids):
                return
            row.cache = None
        for row in plan.rows:
            self.prefilling.remove(row)
        tokens = self._next_tokens(plan.rows, logits)
        keep = []
        for i, row in enumerate(plan.rows):
            row.prefilled = len(row.job.prompt_ids)
            if self._advance(row, int(tokens[i]), logits[i]):
                self.metrics.left_batch()  # finished with its first token
            else:
                keep.append(i)
        if not keep:
            return
        cache = plan.cache
        if len(keep) < len(plan.rows):
            cache.select(keep)
        self.cache = cache if not self.running else KVCache.cat([self.cache, cache])
        self.running.extend(plan.rows[i] for i in keep)

    def _step(self, plan: "_Prefill | None" = None) -> None:
        """One decode step for the whole batch (with `plan`'s prefill in the same pass); finished jobs leave it."""
        self._keep([i for i, row in enumerate(self.running) if not self._abandoned(row)])
        if not self.running:
            if plan is not None:
                self._prefill(plan)
            return
        last = torch.tensor([[row.last] for row in self.running], device=self.decoder.device)  # (B, 1)
        start = time.perf_counter()
        if plan is None:
            logits = self.decoder.next_logits(last, self.cache)  # (B, V)
            self.step_s = _average(self.step_s, time.perf_counter() - start)
        else:  # the weights read once for both: the chunk costs only its tokens' work
            logits, prefill_logits = self.decoder.next_logits_together(
                [(last, self.cache, None), (plan.input_ids.to(self.decoder.device), plan.cache, plan.attention_mask)])
            prefill_s = max(time.perf_counter() - start - self.step_s, 0.1 * self.step_s)
        self.metrics.add("decode_steps")
        tokens = self._next_tokens(self.running, logits)
        self._keep([i for i, row in enumerate(self.running) if not self._advance(row, int(tokens[i]), logits[i])])
        if plan is not None:
            self._finish_prefill(plan, prefill_logits, prefill_s)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.running):
            return
        for _ in range(len(self.running) - len(rows)):
            self.metrics.left_batch()
        self.running = [self.running[i] for i in rows]
        if self.running:
            self.cache.select(rows)
        else:
            self.cache = None

    def _abandoned(self, row: _Row) -> bool:
        """True (and counted, and told) when a job was cancelled or is past its deadline."""
        job = row.job
        if job.cancelled:
            self.metrics.add("cancelled")
            return True
        now = time.monotonic()
        if now - job.started > self.config.timeout_s:
            self.metrics.add("timed_out")
            self._send(job, "error", APIError(
                504, f"The request did not finish within the server's {self.config.timeout_s:g} s generation "
                     f"limit: it waited {job.started - job.arrived:.1f} s for a batch slot (not counted), then "
                     f"ran {now - job.started:.1f} s and generated {job.completion_tokens} tokens. Ask for fewer "
                     "tokens or raise the server's --timeout.",
                "timeout_error", None, "deadline_exceeded", NO_RETRY))
            return True
        return False

    # -- choosing tokens ------------------------------------------------------------------

    def _next_tokens(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The next id of each row from logits (B, V): one argmax for greedy rows with nothing else to apply."""
        if all(r.job.plain and r.job.sampling.greedy for r in rows):
            return logits.argmax(dim=-1).tolist()
        return [self._draw(row, logits[i]) for i, row in enumerate(rows)]

    def _draw(self, row: _Row, logits: torch.Tensor) -> int:
        """One row's next id: OpenAI's logit bias and penalties, then `sample` with the row's parameters."""
        job = row.job
        if job.logit_bias:
            ids = torch.tensor(list(job.logit_bias), device=logits.device)
            logits = logits.index_add(0, ids, torch.tensor(list(job.logit_bias.values()), device=logits.device))
        if row.generated and (job.frequency_penalty or job.presence_penalty):
            counts = torch.bincount(torch.tensor(row.generated, device=logits.device), minlength=logits.size(-1))
            logits = logits - job.frequency_penalty * counts - job.presence_penalty * (counts > 0)
        context = None
        if job.sampling.repetition_penalty != 1.0:
            context = torch.tensor([job.prompt_ids + row.generated], device=logits.device)
        return int(sample(logits[None], job.sampling, row.generator, context, job.completion_tokens, job.eos)[0])

    def _advance(self, row: _Row, token: int, logits: torch.Tensor) -> bool:
        """Record the row's next token (logits (V,) for its log-probabilities) and send its text; True when done."""
        job = row.job
        if job.first_token is None:
            job.first_token = time.monotonic()
        if job.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(logp, job.logprobs) if job.logprobs else None
            row.pending.append((token, float(logp[token]),
                                [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))))
        job.completion_tokens += 1
        self.metrics.tokens(1)
        row.generated.append(token)
        row.last = token
        finish = None
        if token in job.eos:
            finish = "stop"
        else:
            delta = row.text.push(token)
            if delta:
                self._send(job, "text", (delta, row.pending))
                row.pending = []
            if row.text.stopped:
                finish = "stop"
            elif job.completion_tokens >= job.max_tokens:
                finish = "length"
        if finish is None:
            return False
        if tail := row.text.finish():
            self._send(job, "text", (tail, row.pending))
            row.pending = []
        self._send(job, "done", (finish, row.pending))
        self.metrics.add("completed")
        return True


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def _average(old: float, new: float, weight: float = 0.3) -> float:
    """Exponential moving average (the first value as it is)."""
    return new if not old else (1 - weight) * old + weight * new


def _failed(e: Exception) -> APIError:
    return APIError(500, f"Generation failed: {type(e).__name__}: {e}", "server_error", headers=NO_RETRY)
