"""The official `openai` client against a real `llmlab serve` (a subprocess on 127.0.0.1): every
field clients send today works as OpenAI documents it, streaming and not, and every field the
server does not implement is a 400 naming it."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from llmlab import assets
from llmlab import generate as G
from llmlab import serve

MODEL = "course-gpt"
PROMPT = "ROMEO. But soft,"
CHAT = [{"role": "system", "content": "You are Juliet."}, {"role": "user", "content": "Who art thou?"}]


@pytest.fixture(scope="module")
def course():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if assets.state(MODEL) != "cached":
        assets.build(MODEL, quick=True)
    path = assets.resolve(MODEL)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`llmlab serve --model course-gpt` on a free port; returns the process and its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "serve", "--model", MODEL, "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"llmlab serve did not start: {proc.stdout.read()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def url():
    proc, base = start_server("--max-tokens", "32")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def chat_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def greedy(course, ids: list[int], n: int) -> list[int]:
    """The library's greedy decoding, stopping where the server stops."""
    model, tok = course
    return G.generate(model, ids, n, eos_token_id=serve._stop_token_ids(model, tok))


def text_of(course, ids: list[int], n: int) -> str:
    return course[1].decode(greedy(course, ids, n), skip_special_tokens=True)


def streamed(stream) -> tuple[dict[int, str], list]:
    """The text of each choice and the raw chunks of a streamed response."""
    texts: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts, chunks


# ----------------------------------------------------------------------------------------
# Models


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


# ----------------------------------------------------------------------------------------
# max_completion_tokens, stream_options.include_usage


@pytest.mark.parametrize("name", ["max_completion_tokens", "max_tokens"])
def test_max_completion_tokens_bounds_the_answer(course, client, name):
    ids = chat_ids(course[1], CHAT)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, **{name: 5})
    assert r.usage.completion_tokens == len(greedy(course, ids, 5)) <= 5
    assert r.choices[0].message.content == text_of(course, ids, 5)
    texts, chunks = streamed(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, stream=True,
                                                            stream_options={"include_usage": True}, **{name: 5}))
    assert texts[0] == r.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == r.usage.completion_tokens
    assert last.usage.prompt_tokens == len(ids) and last.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_usage_chunk_only_when_asked(client):
    _, chunks = streamed(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                                   stream=True))
    assert all(c.choices for c in chunks) and all(getattr(c, "usage", None) is None for c in chunks)
    _, chunks = streamed(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_max_tokens_disagreeing_with_max_completion_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, max_completion_tokens=6)
    assert e.value.body["param"] == "max_completion_tokens"


# ----------------------------------------------------------------------------------------
# logprobs / top_logprobs: the model's own log-softmax, checked against a forward pass here


def reference_logprobs(course, ids: list[int], generated: list[int]) -> torch.Tensor:
    """(n, V) log-softmax of the model's logits at each generated position (no cache, one forward)."""
    model, _ = course
    with torch.no_grad():
        logits = model(torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_chat_logprobs_and_top_logprobs(course, client):
    model, tok = course
    ids = chat_ids(tok, CHAT)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    generated = greedy(course, ids, 6)
    assert len(content) == len(generated) == r.usage.completion_tokens
    ref = reference_logprobs(course, ids, generated)
    for i, entry in enumerate(content):
        assert entry.token == tok.decode([generated[i]])
        assert entry.logprob == pytest.approx(float(ref[i, generated[i]]), abs=1e-3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(ref[i].topk(3).values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
        assert bytes(entry.bytes).decode("utf-8", "replace") == tok.decode([generated[i]])
    # streamed: the same entries, spread over the chunks
    _, chunks = streamed(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                                        max_completion_tokens=6, logprobs=True, top_logprobs=3,
                                                        stream=True))
    pieces = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in pieces] == [(e.token, round(e.logprob, 4)) for e in content]
    # logprobs without top_logprobs: the chosen token only
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=3,
                                       logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2).choices[0].logprobs is None


def test_completion_logprobs(course, client):
    model, tok = course
    ids = tok(PROMPT)["input_ids"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    generated = greedy(course, ids, 5)
    ref = reference_logprobs(course, ids, generated)
    assert lp.tokens == [tok.decode([t]) for t in generated]
    assert lp.token_logprobs == pytest.approx([float(ref[i, t]) for i, t in enumerate(generated)], abs=1e-3)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_top_logprobs_without_logprobs_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


# ----------------------------------------------------------------------------------------
# Messages: content parts, the developer role; explicit nulls


def test_content_parts_and_developer_role(course, client):
    base = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You are Juliet."}]},
             {"role": "user", "content": [{"type": "text", "text": "Who art"}, {"type": "text", "text": "thou?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=8)
    joined = [CHAT[0], {"role": "user", "content": "Who art\nthou?"}]
    assert r.usage.prompt_tokens == len(chat_ids(course[1], joined))
    assert r.choices[0].message.content == text_of(course, chat_ids(course[1], joined), 8)
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8,
                                       messages=[{"role": "developer", "content": "You are Juliet."}, CHAT[1]])
    assert r.choices[0].message.content == base.choices[0].message.content  # developer = system
    texts, _ = streamed(client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=8,
                                                       stream=True))
    assert texts[0] == text_of(course, chat_ids(course[1], joined), 8)


def test_a_non_text_content_part_is_400(client):
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[image])
    assert e.value.body["param"].startswith("messages.0.content")


def test_explicit_nulls_mean_not_given(url, client):
    base = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=6)
    nulls = dict.fromkeys(["top_p", "top_k", "stop", "seed", "n", "user", "frequency_penalty", "presence_penalty",
                           "logit_bias", "logprobs", "top_logprobs", "max_completion_tokens", "stream",
                           "stream_options", "tools", "tool_choice", "response_format", "store", "metadata",
                           "parallel_tool_calls", "service_tier", "modalities", "audio", "prediction",
                           "reasoning_effort", "repetition_penalty", "length_penalty"])
    body = {"model": MODEL, "messages": [{**m, "name": None} for m in CHAT], "temperature": 0, "max_tokens": 6,
            **nulls}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == base.choices[0].message.content
    # through the client: None is sent as null
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=6, top_p=None,
                                       stop=None, seed=None, presence_penalty=None, logit_bias=None, n=None)
    assert r.choices[0].message.content == base.choices[0].message.content
    # a null temperature is the default (1.0): seeded draws agree with an explicit 1.0
    a = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=None, seed=7)
    b = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


# ----------------------------------------------------------------------------------------
# prompt as a list


def test_prompt_lists(course, client):
    tok = course[1]
    prompts = [PROMPT, "JULIET. Ay me!"]
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
              for p in prompts]
    assert single[0] == text_of(course, tok(PROMPT)["input_ids"], 6)
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == single
    assert r.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)
    assert client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=6, temperature=0).choices[0].text \
        == single[0]
    ids = [tok(p)["input_ids"] for p in prompts]
    assert client.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, temperature=0).choices[0].text \
        == single[0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == single
    texts, chunks = streamed(client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                                       stream=True))
    assert [texts[0], texts[1]] == single
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[[1, 2, 10**6]], max_tokens=2)
    assert e.value.body["param"] == "prompt"


# ----------------------------------------------------------------------------------------
# OpenAI's logit processing: logit_bias, frequency and presence penalties


def test_logit_bias_and_penalties_follow_openais_formula(course, client):
    model, tok = course
    ids = tok(PROMPT)["input_ids"]
    first = greedy(course, ids, 1)[0]
    favourite = (first + 7) % len(tok)
    bias, fp, pp = {favourite: 6.0, first: -100.0}, 1.5, 0.7
    out: list[int] = []
    with torch.no_grad():
        for _ in range(8):  # OpenAI: logit - count * frequency_penalty - (count > 0) * presence_penalty + bias
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel())
            logits = logits - fp * counts - pp * (counts > 0)
            for t, b in bias.items():
                logits[t] += b
            out.append(int(logits.argmax()))
    assert first not in out and out.count(favourite) >= 1  # the bias and the penalty both acted
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                      frequency_penalty=fp, presence_penalty=pp, stream=stream,
                                      logit_bias={str(t): b for t, b in bias.items()})
        tokens = ([t for c in r for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
                  if stream else r.choices[0].logprobs.tokens)
        assert tokens == [tok.decode([t]) for t in out]


# ----------------------------------------------------------------------------------------
# What is not implemented is a 400 naming the field, never silently ignored


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 2}, "n"),
    ({"store": True}, "store"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages.0.role"),
])
def test_unsupported_chat_fields_are_400_naming_them(client, kwargs, param):
    kwargs = {"messages": CHAT, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert param.split(".")[-1] in e.value.body["message"]


@pytest.mark.parametrize("kwargs,param", [
    ({"echo": True}, "echo"), ({"suffix": "END"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 9}, "logprobs"),
])
def test_unsupported_completion_fields_are_400_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **kwargs)
    assert e.value.body["param"] == param, e.value.body


def test_no_effect_values_are_accepted(course, client):
    ids = chat_ids(course[1], CHAT)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=4, tools=[],
                                       response_format={"type": "text"}, store=False, modalities=["text"],
                                       service_tier="auto", user="u1")
    assert r.choices[0].message.content == text_of(course, ids, 4)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=False, best_of=1)
    assert r.choices[0].text == text_of(course, course[1](PROMPT)["input_ids"], 4)
