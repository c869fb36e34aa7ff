"""Serving figures for SmolLM2-135M on this machine, side by side with Hugging Face `generate`.

    .venv/bin/python bench/serving.py [--tokens 64] [--max-tokens 32] [--threads N] [--rounds 2]

Tables (greedy; end of sequence forbidden so that every run makes exactly the tokens asked):
1. the server against `model.generate` on the same model, threads and prompts, measured in
   alternation (`--rounds` times), so both see the same load: one stream (tokens/s of one
   request) and 8 at once (8 concurrent clients against a static batch of 8 left-padded prompts);
2. float32 against int8 and int4 weights (`llmlab serve --quantize`) and w8a8 (int8 weights
   and activations, `serve_quant.quantize_weights(model, "w8a8", calibration)`, smoothed on
   2,048 tokens of the training plays): single-stream tokens/s through the server, bytes of
   weights, held-out perplexity (Shakespeare's test plays) and its change;
3. time to first token and inter-token latency, p50/p95, at 1, 8 and 32 streaming clients
   with --max-batch 8 (32 clients: 8 decode, the others wait in the queue);
4. llama.cpp on the GGUF the asset is converted from (Q4_1), through llama-cpp-python's own
   OpenAI server (`python -m llama_cpp.server`, same threads, see LLAMACPP_SERVER), against
   the server in float32 and int4, in alternation: one stream and 8 concurrent clients
   (llama-cpp-python's server runs one request at a time, so its 8 clients queue:
   `--interrupt_requests False`). Needs the cached bench venv that `bench/llamacpp_venv.sh`
   builds once (10-30 minutes); without it the table says so.
5. `llmlab serve` as users run it, in its own process (`--threads` as here), float32 against
   `--quantize int8` and `int4`, one stream, in alternation: tables 1-4 run the server in this
   process, where the benchmark's client threads share the server's interpreter lock.
Every figure carries the 1-minute load average of the machine when it was taken: on a shared
machine absolute figures move with the load; ratios taken in the same round are the fair ones.
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from llmlab import data, evaluate, quant, runtime, serve
from llmlab.serve_quant import quantize_weights

PROMPTS = [f"Write a long story about a lighthouse keeper and a storm, part {i}." for i in range(32)]


def load() -> str:
    return f"load {os.getloadavg()[0]:4.1f}"


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def hf_generate(model, tokenizer, prompts: list[str], n: int) -> float:
    """Tokens/s of `model.generate` on the prompts as one left-padded static batch, exactly n new tokens each."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == n
    return len(prompts) * n / seconds


def stream_one(url: str, model_name: str, prompt: str, n: int, no_eos: dict) -> dict:
    """One streamed chat request of exactly n tokens: its arrival times of text pieces."""
    body = {"model": model_name, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
            "temperature": 0, "stream": True, "logit_bias": no_eos, "stream_options": {"include_usage": True}}
    start, times, tokens = time.perf_counter(), [], 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:200]!r}")
        for event in serve.iter_sse(r.iter_lines()):
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {"start": start, "times": times, "tokens": tokens or len(times)}  # no usage chunk: one token a piece


def clients(url: str, model_name: str, count: int, n: int, no_eos: dict) -> tuple[float, list[dict]]:
    """`count` concurrent streaming clients, one request each: aggregate tokens/s and each stream's record."""
    results: list[dict] = [{} for _ in range(count)]

    def run(i: int) -> None:
        results[i] = stream_one(url, model_name, PROMPTS[i % len(PROMPTS)], n, no_eos)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert all(r["tokens"] >= n - 1 for r in results), [r.get("tokens") for r in results]
    return count * n / wall, results


def quantiles(values: list[float]) -> tuple[float, float]:
    """(p50, p95)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=20, method="inclusive")
    return statistics.median(values), q[18]


def server(model, tokenizer, name: str, batch: int) -> serve.BackgroundServer:
    """A server (not started: use it in a with block) of `model` with `batch` slots and room for 64 waiting."""
    config = serve.ServerConfig(model_name=name, max_batch=batch, max_queue=64, max_tokens=4096, timeout_s=3600)
    return serve.BackgroundServer(serve.create_app(model, tokenizer, config))


# `python -m llama_cpp.server` with llama.cpp's extra buffer types off (llama-server's
# --no-extra-bufts): on a CPU that reports AMX inside a VM that does not grant its tile state
# (this one), ggml's AMX matmul segfaults at the first token; the AVX-512 kernels then run.
LLAMACPP_SERVER = """
import runpy, sys
import llama_cpp.llama_cpp as C
default = C.llama_model_default_params
def params():
    p = default()
    p.use_extra_bufts = False
    return p
C.llama_model_default_params = params
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def llamacpp(threads: int, name: str) -> subprocess.Popen | str:
    """llama-cpp-python's OpenAI server on the cached GGUF (a started process), or why not."""
    venv = Path(os.environ.get("LLMLAB_HOME", Path.home() / ".cache/llmlab"))
    python, gguf = venv / "bench-venv/bin/python", venv / "bench-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not python.exists() or not gguf.exists():
        return "not built: run bench/llamacpp_venv.sh once (compiles llama.cpp, 10-30 minutes)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(python), "-c", LLAMACPP_SERVER, "--model", str(gguf), "--model_alias", name,
                             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
                             "--interrupt_requests", "False",  # queue concurrent requests, not cut the running one
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    for _ in range(600):
        try:
            if httpx.get(f"{proc.url}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            return f"llama_cpp.server exited with {proc.returncode}"
        time.sleep(0.1)
    proc.kill()
    return "llama_cpp.server did not start within 60 s"


def cli_server(name: str, threads: int, quantize: str | None) -> tuple[subprocess.Popen, str]:
    """`llmlab serve` in a process of its own on a free port, answering: (the process, its URL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "llmlab"), "serve", "--model", name, "--threads", str(threads),
           "--port", str(port), *(["--quantize", quantize] if quantize else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"llmlab serve exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("llmlab serve did not answer within 120 s")


def table_5(name: str, n: int, rounds: int, threads: int, no_eos: dict) -> None:
    """`llmlab serve` in its own process: float32, int8 and int4 weights, one stream, alternating."""
    kinds = (None, "int8", "int4")
    print(f"== 5. `llmlab serve --threads {threads}` in its own process, 1 stream, {n} tokens, the three in "
          f"alternation {rounds} times")
    print(f"{'round':>5} " + " ".join(f"{k or 'float32':>14}" for k in kinds))
    servers = []
    try:
        for kind in kinds:
            servers.append(cli_server(name, threads, kind))
            stream_one(servers[-1][1], name, PROMPTS[0], 4, no_eos)  # warm-up
        for r in range(rounds):
            rates = []
            for _, url in servers:
                one = stream_one(url, name, PROMPTS[0], n, no_eos)
                rates.append(one["tokens"] / (one["times"][-1] - one["start"]))
            print(f"{r + 1:>5} " + " ".join(f"{x:5.1f} t/s {x / rates[0]:4.2f}x" for x in rates) + f"  ({load()})")
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request in tables 1, 2, 4 and 5")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request in table 3")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of server and HF generate")
    parser.add_argument("--tables", default="12345", help="which tables to print, e.g. 14")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens for the perplexity")
    args = parser.parse_args()
    threads = runtime.set_threads(args.threads)
    model, tokenizer = serve.load(args.model)
    name = args.model
    eos = serve._stop_token_ids(model, tokenizer)
    no_eos = {str(i): -100 for i in eos}
    n = args.tokens
    print(f"{name}: float32, {threads} threads, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{load()} at start\n")

    if "1" in args.tables:
        table_1(model, tokenizer, name, n, args.rounds, no_eos)
    if "2" in args.tables:
        table_2(model, tokenizer, name, n, args.ppl_tokens, args.rounds, no_eos)
    if "3" in args.tables:
        table_3(model, tokenizer, name, args.max_tokens, no_eos)
    if "4" in args.tables:
        table_4(model, tokenizer, name, n, args.rounds, threads, no_eos)
    if "5" in args.tables:
        table_5(name, n, args.rounds, threads, no_eos)


def table_1(model, tokenizer, name: str, n: int, rounds: int, no_eos: dict) -> None:
    """The server against HF generate, alternating, one stream and 8 at once."""
    print(f"== 1. server vs HF model.generate, {n} new tokens per request (greedy)")
    print(f"{'round':>5} {'':<12} {'HF generate':>12} {'server':>10} {'ratio':>7}")
    with server(model, tokenizer, name, 8) as running:
        stream_one(running.url, name, PROMPTS[0], 4, no_eos)  # warm-up
        hf_generate(model, tokenizer, PROMPTS[:1], 4)
        for r in range(rounds):
            hf1 = hf_generate(model, tokenizer, PROMPTS[:1], n)
            one = stream_one(running.url, name, PROMPTS[0], n, no_eos)
            s1 = one["tokens"] / (one["times"][-1] - one["start"])
            print(f"{r + 1:>5} {'1 stream':<12} {hf1:9.1f} t/s {s1:6.1f} t/s {s1 / hf1:6.2f}x  ({load()})")
            hf8 = hf_generate(model, tokenizer, PROMPTS[:8], n)
            s8, _ = clients(running.url, name, 8, n, no_eos)
            print(f"{r + 1:>5} {'8 at once':<12} {hf8:9.1f} t/s {s8:6.1f} t/s {s8 / hf8:6.2f}x  ({load()})")
    print()


def table_2(model, tokenizer, name: str, n: int, ppl_tokens: int, rounds: int, no_eos: dict) -> None:
    """float32, int8, int4 and w8a8 weights: bytes, held-out perplexity, tokens/s in alternation."""
    kinds = ("float32", "int8", "int4", "w8a8")
    print(f"== 2. weights: {', '.join(kinds)} (server, 1 stream, {n} tokens, the four in alternation "
          f"{rounds} times; perplexity on {ppl_tokens} held-out tokens)")
    corpus = data.lm_corpus("shakespeare")
    held_out = quant.token_ids(tokenizer, corpus["test"], ppl_tokens)
    calibration = quant.token_ids(tokenizer, corpus["train"], 2048)  # w8a8's smoothing: training text only
    models = {k: model if k == "float32" else quantize_weights(copy.deepcopy(model), k, calibration) for k in kinds}
    ppl = {k: evaluate.perplexity(m, held_out, 256, 8) for k, m in models.items()}
    print(f"{'weights':<8} {'MB':>7} {'perplexity':>11} {'change':>8}")
    for k, m in models.items():
        print(f"{k:<8} {quant.model_bytes(m) / 1e6:7.1f} {ppl[k]:11.3f} {(ppl[k] - ppl['float32']) / ppl['float32']:+8.2%}")
    print(f"{'round':>5} " + " ".join(f"{k:>14}" for k in kinds))
    servers = [server(m, tokenizer, name, 8) for m in models.values()]
    try:
        for s in servers:
            s.start()
            stream_one(s.url, name, PROMPTS[0], 4, no_eos)  # warm-up
        for r in range(rounds):
            rates = []
            for s in servers:
                one = stream_one(s.url, name, PROMPTS[0], n, no_eos)
                rates.append(one["tokens"] / (one["times"][-1] - one["start"]))
            print(f"{r + 1:>5} " + " ".join(f"{x:5.1f} t/s {x / rates[0]:4.2f}x" for x in rates) + f"  ({load()})")
    finally:
        for s in servers:
            s.stop()
    print()


def table_3(model, tokenizer, name: str, max_tokens: int, no_eos: dict) -> None:
    """TTFT and inter-token latency at 1, 8 and 32 clients."""
    print(f"== 3. latency, streaming chat requests of {max_tokens} tokens, --max-batch 8")
    print(f"{'clients':>7} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>9} {'p95':>7} {'tokens/s':>9}")
    with server(model, tokenizer, name, 8) as running:
        stream_one(running.url, name, PROMPTS[0], 4, no_eos)
        for count in (1, 8, 32):
            rate, results = clients(running.url, name, count, max_tokens, no_eos)
            ttft = [r["times"][0] - r["start"] for r in results]
            itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
            (t50, t95), (i50, i95) = quantiles(ttft), quantiles(itl)
            print(f"{count:>7} {t50:8.2f}s {t95:6.2f}s {i50 * 1e3:7.0f}ms {i95 * 1e3:5.0f}ms {rate:9.1f}  ({load()})")
    print()


def table_4(model, tokenizer, name: str, n: int, rounds: int, threads: int, no_eos: dict) -> None:
    """llama.cpp's server against ours (float32 and int4), alternating."""
    print(f"== 4. llama.cpp (Q4_1 GGUF, llama-cpp-python's server, {threads} threads) vs the server, "
          f"{n} new tokens per request")
    peer = llamacpp(threads, name)
    if isinstance(peer, str):
        print(f"llama.cpp: {peer}")
        return
    int4 = quantize_weights(copy.deepcopy(model), "int4")
    print(f"{'round':>5} {'':<12} {'llama.cpp':>10} {'fp32':>10} {'vs':>6} {'int4':>10} {'vs':>6}")
    try:
        with server(model, tokenizer, name, 8) as fp32, server(int4, tokenizer, name, 8) as q4:
            for url in (peer.url, fp32.url, q4.url):
                stream_one(url, name, PROMPTS[0], 4, no_eos)  # warm-up
            for r in range(rounds):
                rates = []
                for url in (peer.url, fp32.url, q4.url):
                    one = stream_one(url, name, PROMPTS[0], n, no_eos)
                    rates.append(one["tokens"] / (one["times"][-1] - one["start"]))
                lc, f, q = rates
                print(f"{r + 1:>5} {'1 stream':<12} {lc:6.1f} t/s {f:6.1f} t/s {f / lc:5.2f}x {q:6.1f} t/s "
                      f"{q / lc:5.2f}x  ({load()})")
                lc, f, q = (clients(url, name, 8, n, no_eos)[0] for url in (peer.url, fp32.url, q4.url))
                print(f"{r + 1:>5} {'8 at once':<12} {lc:6.1f} t/s {f:6.1f} t/s {f / lc:5.2f}x {q:6.1f} t/s "
                      f"{q / lc:5.2f}x  ({load()})")
    finally:
        peer.terminate()
        peer.wait()


if __name__ == "__main__":
    main()
