"""llmlab.serve over real HTTP (uvicorn on 127.0.0.1, a free port): OpenAI shapes, greedy
answers equal to the library's, SSE streaming, continuous batching, every error case with its
status and shape, the queue limit, deadlines, cancellation on disconnect, the API key, and a
bounded schemathesis fuzz run with no 5xx."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from llmlab import assets
from llmlab import generate as G
from llmlab import serve

MODEL = "course-gpt"


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if assets.state(MODEL) != "cached":
        assets.build(MODEL, quick=True)
    path = assets.resolve(MODEL)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def course():
    return load()


@pytest.fixture(scope="module")
def server(course):
    """course-gpt (64-token context) behind the real server; max_tokens capped at 32."""
    model, tok = course
    app = serve.create_app(model, tok, serve.ServerConfig(model_name=MODEL, max_tokens=32, max_batch=4, max_queue=8))
    with serve.BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def slow_server():
    """A server whose every forward pass takes >= 40 ms: 2 batch slots, 1 queue slot, a 1.5 s deadline
    (45 steps always miss it; 12 steps meet it unless a step takes over 100 ms)."""
    model, tok = load()
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: time.sleep(0.04))  # every forward
    config = serve.ServerConfig(model_name=MODEL, max_tokens=48, max_batch=2, max_queue=1, timeout_s=1.5)
    with serve.BackgroundServer(serve.create_app(model, tok, config)) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def metrics(url: str) -> dict:
    return httpx.get(f"{url}/metrics", timeout=10).json()


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The response is `status` with exactly OpenAI's error shape; return the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def reference(course, ids: list[int], n: int) -> str:
    """What the library's own greedy decoding says, decoded as the server decodes."""
    model, tok = course
    out = G.generate(model, ids, n, eos_token_id=serve._stop_token_ids(model, tok))
    return tok.decode(out, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------
# The API


def test_binds_loopback_and_answers_health_models_metrics(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    m = client.get("/metrics").json()
    for key in ("requests", "completed", "cancelled", "timed_out", "rejected", "completion_tokens",
                "tokens_per_second", "queue_depth", "running", "decode_steps"):
        assert key in m, key


def test_greedy_completion_equals_the_library(course, client):
    _, tok = course
    body = {"model": MODEL, "prompt": "ROMEO. But soft,", "max_tokens": 20, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    ids = tok(body["prompt"])["input_ids"]
    assert data["choices"][0]["text"] == reference(course, ids, 20)
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 20, "total_tokens": len(ids) + 20}
    assert data["choices"][0]["finish_reason"] == "length"


def test_chat_completion_applies_the_chat_template(course, client):
    _, tok = course
    messages = [{"role": "system", "content": "You are Juliet."}, {"role": "user", "content": "Who art thou?"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 12,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert data["usage"]["prompt_tokens"] == len(ids)
    assert data["choices"][0]["message"]["content"] == reference(course, list(ids), 12)


def test_streaming_sends_the_same_text_as_server_sent_events(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 15, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in lines
    events = list(serve.iter_sse(lines))
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == whole
    assert len(events) > 3  # one piece at a time, not the whole answer at once


def test_stop_strings_and_seeds(client):
    body = {"model": MODEL, "prompt": "KING.", "max_tokens": 30, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    cut = full[4:7]
    r = client.post("/v1/completions", json={**body, "stop": [cut, "@@@"]}).json()
    assert r["choices"][0]["text"] == full[:full.index(cut)] and r["choices"][0]["finish_reason"] == "stop"
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first = client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=sampled).json()["choices"][0]["text"] == first
    assert client.post("/v1/completions", json={**sampled, "seed": 99}).json()["choices"][0]["text"] != first


def test_concurrent_requests_share_decode_steps_and_match_one_by_one(course, slow_server):
    _, tok = course
    prompts = ["ROMEO.", "JULIET. Ay me!"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 10, "temperature": 0}
        results[i] = httpx.post(f"{slow_server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]

    before = metrics(slow_server.url)["decode_steps"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = metrics(slow_server.url)["decode_steps"] - before
    assert steps < 2 * 9, f"{steps} decode steps for 2 x 10 tokens: the requests were not batched"
    for i, prompt in enumerate(prompts):
        assert results[i] == reference(course, tok(prompt)["input_ids"], 10)


def test_prompts_joining_a_running_batch_in_chunks_match_one_by_one(course):
    """Four requests a little apart, prompts prefilled in 8-token chunks that ride on the running
    batch's decode steps (one pass for both) or together (a burst): each answer is still the library's."""
    _, tok = course
    model, _ = load()
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: time.sleep(0.01))
    config = serve.ServerConfig(model_name=MODEL, max_tokens=32, max_batch=4, max_queue=4, prefill_chunk=8)
    prompts = ["ROMEO.", "JULIET. Ay me! What light through yonder window", "KING. Now is the winter", "HAMLET. To be"]
    results: dict[int, str] = {}
    with serve.BackgroundServer(serve.create_app(model, tok, config)) as server:
        def ask(i: int) -> None:
            body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 12, "temperature": 0}
            results[i] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        stats = metrics(server.url)
    assert stats["prefill_chunks"] >= 2 and stats["completed"] == 4, stats
    for i, prompt in enumerate(prompts):
        assert results[i] == reference(course, tok(prompt)["input_ids"], 12), prompt


# ----------------------------------------------------------------------------------------
# Errors: status code and OpenAI's shape


@pytest.mark.parametrize("content,code,param", [
    (b'{"model": "course-gpt", "prompt": ', "invalid_json", None),
    (b"[1, 2]", "invalid_body", None),
    (b'{"model": "course-gpt"}', "missing_required_parameter", "prompt"),
    (b'{"prompt": "hi"}', "missing_required_parameter", "model"),
    (b'{"model": "course-gpt", "prompt": 7}', "invalid_value", "prompt"),
    (b'{"model": "course-gpt", "prompt": "hi", "max_tokens": 0}', "invalid_value", "max_tokens"),
    (b'{"model": "course-gpt", "prompt": "hi", "max_tokens": 33}', "invalid_value", "max_tokens"),
    (b'{"model": "course-gpt", "prompt": "hi", "temperature": -0.5}', "invalid_value", "temperature"),
    (b'{"model": "course-gpt", "prompt": "hi", "top_p": 0}', "invalid_value", "top_p"),
    (b'{"model": "course-gpt", "prompt": "hi", "n": 2}', "invalid_value", "n"),
    (b'{"model": "course-gpt", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "invalid_value", "stop"),
    (b'{"model": "course-gpt", "prompt": ""}', "invalid_value", "prompt"),
])
def test_bad_completion_requests_are_400(client, content, code, param):
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, code, param)


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
])
def test_bad_chat_requests_are_400(client, body, param):
    assert_error(client.post("/v1/chat/completions", json=body), 400, param=param)


def test_prompt_beyond_the_context_is_400_with_token_counts(course, client):
    _, tok = course
    prompt = "Romeo, Romeo, wherefore art thou Romeo? " * 4
    n = len(tok(prompt)["input_ids"])
    assert n > 64
    error = assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5}),
                         400, "context_length_exceeded", "prompt")
    assert "64" in error["message"] and f"{n + 5}" in error["message"] and f"{n} in the prompt" in error["message"]
    # a prompt that fits alone, but not with its completion
    short = next(t for t in ("Romeo, wherefore art thou? " * k for k in range(1, 20)) if len(tok(t)["input_ids"]) > 40)
    m = len(tok(short)["input_ids"])
    assert m < 64
    error = assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": short, "max_tokens": 30}),
                         400, "context_length_exceeded", "prompt")
    assert f"{m + 30} tokens ({m} in the prompt, 30 in the completion)" in error["message"]


def test_unknown_model_route_and_method_keep_the_shape(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert_error(r, 404, "model_not_found", "model")
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_api_key_is_required_when_set(course):
    model, tok = course
    app = serve.create_app(model, tok, serve.ServerConfig(model_name=MODEL, api_key="s3cret"))

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.get("/v1/models"), await c.get("/v1/models", headers={"Authorization": "Bearer nope"}),
                    await c.post("/v1/completions", content=b"{bad json"),
                    await c.get("/metrics"),
                    await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}), await c.get("/health")]

    missing, wrong, bad_json, metrics_, right, health = asyncio.run(calls())
    for r in (missing, wrong, bad_json, metrics_):
        assert_error(r, 401, "invalid_api_key")
    assert right.status_code == 200 and health.status_code == 200


# ----------------------------------------------------------------------------------------
# Limits: queue, deadline, disconnect


def test_a_full_queue_answers_429(slow_server):
    url = slow_server.url
    before = metrics(url)
    body = {"model": MODEL, "prompt": "KING.", "max_tokens": 8, "temperature": 0}
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def ask() -> None:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        with lock:
            responses.append(r)

    threads = [threading.Thread(target=ask) for _ in range(6)]  # 2 running + 1 waiting fit
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in responses)
    # capacity 3 (2 running + 1 waiting); a loaded machine may start a thread after the first answers
    assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429, "queue_full")
            assert 1 <= int(r.headers["retry-after"]) <= 60  # seconds until a slot is likely free
    assert metrics(url)["rejected"] - before["rejected"] == codes.count(429)


def test_a_request_past_its_deadline_is_504_not_to_be_retried(slow_server):
    url = slow_server.url
    before = metrics(url)["timed_out"]
    body = {"model": MODEL, "prompt": "KING.", "max_tokens": 45, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)  # 45 steps x 40 ms > 1.5 s
    error = assert_error(r, 504, "deadline_exceeded")
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    assert "waited" in error["message"] and "for a batch slot (not counted)" in error["message"]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        events = list(serve.iter_sse(r.iter_lines()))
    assert events[-1]["error"]["code"] == "deadline_exceeded" and len(events) > 1
    assert metrics(url)["timed_out"] - before == 2


def test_the_official_client_does_not_retry_a_deadline(slow_server):
    import openai

    before = metrics(slow_server.url)
    with openai.OpenAI(base_url=f"{slow_server.url}/v1", api_key="unused", max_retries=2) as client:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt="KING.", max_tokens=45, temperature=0)
    assert e.value.status_code == 504
    after = metrics(slow_server.url)
    assert after["requests"] - before["requests"] == 1 and after["timed_out"] - before["timed_out"] == 1


def test_admission_counts_the_running_batch_and_the_queue(slow_server):
    """max_batch=2 + max_queue=1: three held requests fill the server; a fourth gets 429 + Retry-After."""
    import openai

    url = slow_server.url
    body = {"model": MODEL, "prompt": "KING.", "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as c:
        streams = [c.stream("POST", "/v1/completions", json=body) for _ in range(3)]
        opened = [s.__enter__() for s in streams]
        try:
            held = metrics(url)
            assert held["running"] + held["queue_depth"] == 3, held
            r = c.post("/v1/completions", json={**body, "stream": False})
            assert_error(r, 429, "queue_full")
            assert 1 <= int(r.headers["retry-after"]) <= 60
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=MODEL, prompt="KING.", max_tokens=2)
            answers = [list(serve.iter_sse(s.iter_lines())) for s in opened]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert all(a[-1]["choices"][0]["finish_reason"] == "length" for a in answers)


def test_the_deadline_does_not_count_the_queue(course):
    """One slot, 2 s generation deadline: the 4th request waits for three others, longer than the
    deadline in all, and still gets its answer (each ran well within the deadline)."""
    model, tok = load()
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: time.sleep(0.04))  # every forward
    config = serve.ServerConfig(model_name=MODEL, max_tokens=48, max_batch=1, max_queue=3, timeout_s=2.0)
    body = {"model": MODEL, "prompt": "KING.", "max_tokens": 15, "temperature": 0}
    latencies: dict[int, float] = {}
    codes: dict[int, int] = {}
    with serve.BackgroundServer(serve.create_app(model, tok, config)) as server:
        def ask(i: int) -> None:
            start = time.perf_counter()
            codes[i] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code
            latencies[i] = time.perf_counter() - start

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert set(codes.values()) == {200}, codes
    assert max(latencies.values()) > config.timeout_s, latencies  # the last one waited past the deadline


def test_disconnect_mid_stream_cancels_the_generation(slow_server):
    url = slow_server.url
    before = metrics(url)
    body = {"model": MODEL, "prompt": "KING.", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        for event in serve.iter_sse(r.iter_lines()):
            if event["choices"][0]["text"]:
                break  # got the first piece; leaving the block closes the connection
    deadline = time.monotonic() + 5
    while metrics(url)["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = metrics(url)
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["timed_out"] == before["timed_out"] and after["completed"] == before["completed"]
    time.sleep(0.3)  # nothing keeps generating for the closed stream
    assert metrics(url)["completion_tokens"] - before["completion_tokens"] < 15
    assert metrics(url)["running"] == 0


# ----------------------------------------------------------------------------------------
# Fuzzing: random valid and invalid requests from the OpenAPI schema, no 5xx


@pytest.fixture(scope="module")
def fuzz_server(course):
    """course-gpt with max_tokens capped at 4, so that valid fuzzed requests stay quick."""
    model, tok = course
    app = serve.create_app(model, tok, serve.ServerConfig(model_name=MODEL, max_tokens=4))
    with serve.BackgroundServer(app) as running:
        yield running


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzed_requests_never_cause_a_server_error(fuzz_server, mode):
    """Every operation of the app's own OpenAPI schema, with valid (positive) or schema-violating
    (negative) requests: 20 examples each, over loopback; 4xx in OpenAI's shape, never a 5xx."""
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/metrics"}
    seen = set()

    for operation in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and not operation.body:
            continue  # no input to get wrong
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(timeout=30)
            seen.add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
            case.validate_response(response, checks=[not_a_server_error])

        call()
    assert (200 in seen) if mode == schemathesis.GenerationMode.POSITIVE else (400 in seen), seen


# ----------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
def test_llmlab_serve_command():
    import socket
    import subprocess
    import sys

    from llmlab import cli

    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, "smollm2-135m-instruct")
    args = cli.build_parser().parse_args(["serve", "--threads", "1", "--max-batch", "4", "--max-queue", "5",
                                          "--timeout", "9", "--max-tokens", "77"])
    assert (args.threads, args.max_batch, args.max_queue, args.timeout, args.max_tokens) == (1, 4, 5, 9.0, 77)
    defaults = serve.machine_defaults()
    assert set(defaults) == {"threads", "max_batch", "max_queue", "max_tokens", "timeout_s"}
    assert 1 <= defaults["threads"] <= os.cpu_count() and defaults["max_queue"] == 4 * defaults["max_batch"]
    serve.ServerConfig(**{k: v for k, v in defaults.items() if k != "threads"})  # valid limits
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "serve", "--model", MODEL, "--port", str(port),
                             "--api-key", "k3y", "--threads", "1", "--max-batch", "2", "--max-queue", "3",
                             "--timeout", "30", "--max-tokens", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        assert_error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
        r = httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer k3y"},
                       json={"model": MODEL, "prompt": "KING.", "max_tokens": 21})
        assert_error(r, 400, "invalid_value", "max_tokens")  # --max-tokens 20
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "(float32 weights), 1 threads, max_batch=2, max_queue=3, max_tokens=20, timeout=30 s" in out, out
