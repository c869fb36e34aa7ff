"""OpenAI's HTTP protocol as `llmlab.serve` speaks it: errors, request schemas, response objects.

Read top-down: the error shape (`APIError`) -> the request bodies of `/v1/completions` and
`/v1/chat/completions` (pydantic; OpenAI's field names, and vLLM's for `top_k` and the
penalties) -> the rule for the fields OpenAI defines and this server does not implement
(`check_fields`) -> FastAPI's validation errors turned into OpenAI's 400s -> `Reply`, which
builds the response objects, streamed chunks, usage and log-probabilities.

What is accepted is implemented; everything else is a 400 that names the field:
* an explicit `null` means "not given" for every optional field, nested ones included;
* `max_completion_tokens` is chat's new name for `max_tokens` (both given: they must agree);
* `stream_options.include_usage` adds a last chunk with `usage` (and `"usage": null` before it);
* `logprobs` (+ `top_logprobs`) are the model's own log-probabilities: the log-softmax of its
  logits before temperature, top-k/top-p and penalties (vLLM's default), like OpenAI's;
* `frequency_penalty`, `presence_penalty` and `logit_bias` act on the logits as OpenAI documents;
* a message's `content` may be a list of text parts (joined with a newline, as vLLM does),
  and the `developer` role is the system role of models that predate it;
* `prompt` may be a string, a list of strings, a list of token ids or a list of those lists:
  one choice per prompt;
* OpenAI fields with no meaning here (`tools`, `response_format`, `store`...) are accepted only
  with the value that changes nothing (`[]`, `{"type": "text"}`, `false`...); an unknown field
  is a 400 "Unrecognized request argument".
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, model_validator

# ----------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    headers: extra response headers (Retry-After for 429; x-should-retry: false where a retry
    would only repeat the same work: the official client obeys it before the status code).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, detail: str = "") -> APIError:
    """400 for a field this server knows but does not implement (with that value)."""
    return APIError(400, f"'{param}' is not supported by this server{': ' + detail if detail else ''}.",
                    param=param, code="unsupported_parameter")


# ----------------------------------------------------------------------------------------
# Request bodies


class _NullMeansAbsent(BaseModel):
    """Every optional field accepts an explicit null, meaning "not given"."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            required = {n for n, f in cls.model_fields.items() if f.is_required()}
            return {k: v for k, v in data.items() if v is not None or k in required}
        return data


class StreamOptions(_NullMeansAbsent):
    """stream_options: with include_usage, a last chunk carries the usage (its choices empty)."""

    include_usage: bool = False
    include_obfuscation: Literal[False] = Field(False, description="no obfuscation padding is sent")


class _GenerationFields(_NullMeansAbsent):
    """Fields shared by completions and chat completions (OpenAI's names; top_k and the penalties as in vLLM)."""

    model_config = ConfigDict(extra="allow")  # known-but-unsupported and unknown fields: `check_fields`

    model: str = Field(description="the model id, as listed by /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (capped by the server)")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    length_penalty: float = Field(0.0, ge=-10, le=10, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, max_length=300, description="token id (as a string) -> bias added to its logit")
    stop: Annotated[str, Field(min_length=1)] | Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    user: str | None = Field(None, description="an end-user id; it does not change the answer")


class CompletionRequest(_GenerationFields):
    """POST /v1/completions: continue a text (or several: one choice each)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5, description="the log-probabilities of this many likeliest tokens")


class TextPart(_NullMeansAbsent):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_NullMeansAbsent):
    """One turn of a conversation."""

    role: Literal["developer", "system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined with a newline)."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions: the assistant's next turn, the conversation formatted by the chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="chat's new name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


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
    (400, "bad JSON or schema, an unsupported field, prompt beyond the context, bad max_tokens"),
    (401, "missing or wrong API key"), (404, "unknown model"), (413, "body too large"),
    (429, "the running batch and the queue are full (Retry-After)"), (504, "generation deadline exceeded"))}


# ----------------------------------------------------------------------------------------
# OpenAI fields without an implementation here: accepted only with a value that changes nothing

_NO_EFFECT: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "parallel_tool_calls": (True, False),  # without tools there is nothing to run in parallel
    "response_format": ({"type": "text"},), "modalities": (["text"],), "store": (False,), "metadata": ({},),
    "service_tier": ("auto", "default"), "echo": (False,), "best_of": (1,), "suffix": ("",),
    "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (), "verbosity": (),
    "prompt_cache_key": (), "prompt_cache_options": (), "prompt_cache_retention": (), "safety_identifier": (),
    "moderation": (),
}


def check_fields(body: _GenerationFields, chat: bool) -> None:
    """Raise a 400 naming the first field this server would otherwise ignore."""
    for name, value in (body.model_extra or {}).items():
        if value is None:
            continue  # an explicit null: not given
        if name not in _NO_EFFECT or (chat and name in ("echo", "best_of", "suffix")):
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
        allowed = _NO_EFFECT[name]
        if not any(value == v and type(value) is type(v) for v in allowed):
            raise unsupported(name, f"only {' or '.join(map(repr, allowed))} is accepted" if allowed
                              else "leave it out or send null")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                       code="invalid_value")
    if chat and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs",
                       code="invalid_value")
    if chat and None not in (body.max_tokens, body.max_completion_tokens) \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them.",
                       param="max_completion_tokens", code="invalid_value")


def validation_error(exc: RequestValidationError) -> APIError:
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
    if first["type"] == "extra_forbidden" and param:
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if not param:
        return APIError(400, f"The request body must be a JSON object ({first['msg']}).", code="invalid_body")
    return APIError(400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value")


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages.0.role'; stops at pydantic's union labels ('str', 'list[int]')."""
    parts = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if not (isinstance(part, int) or part.isidentifier()) or part in ("str", "int", "float", "bool"):
            break
        parts.append(str(part))
    return ".".join(parts) or None


# ----------------------------------------------------------------------------------------
# Responses


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The UTF-8 bytes one token stands for (a byte-level BPE token may hold half a character)."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(ch in table for ch in piece):
        return [table[ch] for ch in piece]
    return list(tokenizer.decode([int(token_id)]).encode())


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable stand-in character of each byte -> the byte."""
    if not _BYTES:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTES.update({chr(c): b for b, c in zip(bs, cs)})
    return _BYTES


_BYTES: dict[str, int] = {}


class Reply:
    """Builds OpenAI's response objects for one request of one or more choices.

    Log-probabilities arrive from the scheduler as (token_id, logprob, [(id, logprob), ...]).
    """

    def __init__(self, model: str, chat: bool, prompt_tokens: int, tokenizer: Any, logprobs: int | None = None,
                 include_usage: bool = False):
        self.model, self.chat, self.prompt_tokens, self.tokenizer = model, chat, prompt_tokens, tokenizer
        self.logprobs, self.include_usage = logprobs, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # completions: text offset reached by each choice

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self, completion_tokens: int) -> dict:
        """The token counts of the whole request."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def chunk(self, index: int, text: str | None, logprobs: list | None = None, finish_reason: str | None = None,
              role: bool = False) -> dict:
        """One streamed piece of choice `index`."""
        lp = self._logprobs(index, logprobs or []) if self.logprobs is not None else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            out = self._envelope("chat.completion.chunk", [choice])
        else:
            out = self._envelope("text_completion", [{"index": index, "text": text or "", "logprobs": lp,
                                                      "finish_reason": finish_reason}])
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, completion_tokens: int) -> dict:
        """stream_options.include_usage: the last chunk, no choices, the usage of the request."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": self.usage(completion_tokens)}

    def full(self, choices: list[tuple[str, str, list]], completion_tokens: int) -> dict:
        """The whole answer at once: choices are (text, finish_reason, logprobs) in index order."""
        out = []
        for index, (text, finish_reason, logprobs) in enumerate(choices):
            lp = self._logprobs(index, logprobs) if self.logprobs is not None else None
            if self.chat:
                out.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": lp, "finish_reason": finish_reason})
            else:
                out.append({"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(obj, out), "usage": self.usage(completion_tokens)}

    def _logprobs(self, index: int, entries: list) -> dict:
        decode = lambda i: self.tokenizer.decode([int(i)])  # noqa: E731
        if self.chat:
            content = [{"token": decode(t), "logprob": lp, "bytes": token_bytes(self.tokenizer, t),
                        "top_logprobs": [{"token": decode(i), "logprob": v, "bytes": token_bytes(self.tokenizer, i)}
                                         for i, v in top]} for t, lp, top in entries]
            return {"content": content, "refusal": None}
        tokens = [decode(t) for t, _, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(token)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{decode(i): v for i, v in top} for _, _, top in entries], "text_offset": offsets}
