"""Quantization of real models: size and held-out perplexity of SmolLM2-135M, and the CPU
speed of torch's dynamic int8 on the MiniLM encoder.

    .venv/bin/python bench/quantization.py [--tokens 4096] [--gptq] [--threads N]
    python bench/quantization.py --device cuda --tokens 32768 --gptq     # on a GPU

Language model (`--model`, default smollm2-135m-instruct), evaluated on the first `--tokens`
tokens of a held-out split (`--corpus`: the test plays of lm_corpus("shakespeare"), or
"bbc-news" test articles), in non-overlapping windows of `--block` tokens. Rows: fp32; int8
absmax per-channel; int4 absmax groups of 128 and of 64 (weight-only `QuantLinear`, lm_head
kept in full precision as is usual); with `--gptq` also int4 g64 by the GPTQ-style
quantizer, calibrated on `--calib` sequences from the TRAIN split. Size = bytes of the
model's state (the tied embedding counted once).

Encoder: all-MiniLM-L6-v2 fp32 vs `torch.ao` dynamic int8 (CPU), a batch of `--sentences`
sentences: median latency of the forward pass and mean cosine similarity of the embeddings.

Note: the SmolLM2 weights in the asset cache were de-quantized from a Q4_1 GGUF (groups of
32, 4-bit), so "fp32" is already a 4-bit model stored in floats. Figures, not pass/fail.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from llmlab import assets, data, quant, runtime


def held_out_texts(corpus: str) -> tuple[list[str], list[str]]:
    """(test texts, train texts) of the named corpus."""
    if corpus == "bbc-news":
        splits = data.load_bbc_news().splits
        return splits["test"][0], splits["train"][0]
    texts = data.lm_corpus(corpus)
    return texts["test"], texts["train"]


def lm_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    path = assets.resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    test, train = held_out_texts(args.corpus)
    ids = quant.token_ids(tokenizer, test, args.tokens)
    print(f"{args.model}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters; "
          f"{len(ids):,} held-out tokens of {args.corpus} (test split), windows of {args.block}")
    variants = [("fp32", None), ("int8 per-channel", dict(bits=8, group_size=None)),
                ("int4 g128", dict(bits=4, group_size=128)), ("int4 g64", dict(bits=4, group_size=64))]
    rows = []
    for name, spec in variants:
        model = base if spec is None else quant.quantize_model(copy.deepcopy(base), **spec)
        rows.append(measure(name, model, ids, args))
        if spec is not None:
            del model
    if args.gptq:
        calib = quant.token_ids(tokenizer, train, args.calib * args.block)
        calib = calib[: len(calib) // args.block * args.block].view(-1, args.block)
        start = time.perf_counter()
        model = quant.gptq_model(copy.deepcopy(base), calib, bits=4, group_size=64)
        print(f"GPTQ-style int4 g64: {time.perf_counter() - start:.0f} s for {len(calib)} x {args.block} calibration tokens")
        rows.append(measure("int4 g64 GPTQ-style", model, ids, args))
    return rows


def measure(name: str, model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    ppl = quant.perplexity(model, ids, args.block, args.batch)
    print(f"  {name:22} perplexity {ppl:8.3f}   ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"name": name, "bytes": quant.model_bytes(model), "perplexity": ppl}


def encoder_rows(args: argparse.Namespace) -> list[dict]:
    path = assets.resolve("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp32 = AutoModel.from_pretrained(path).eval()
    int8 = quant.dynamic_int8(fp32)
    texts = data.load_bbc_news().splits["test"][0]
    sentences = [t.split("\n")[0][:300] for t in texts[: args.sentences]]  # the headlines
    ref = quant.sentence_embeddings(fp32, tokenizer, sentences)
    rows = []
    for name, model in (("MiniLM fp32", fp32), ("MiniLM dynamic int8", int8)):
        emb = quant.sentence_embeddings(model, tokenizer, sentences)
        seconds = quant.latency(lambda: quant.sentence_embeddings(model, tokenizer, sentences), args.repeats)
        rows.append({"name": name, "bytes": quant.model_bytes(model), "cosine": float((emb * ref).sum(-1).mean()),
                     "seconds": seconds})
    print(f"MiniLM: {len(sentences)} sentences per call, median of {args.repeats} calls, "
          f"{torch.get_num_threads()} threads, engine {torch.backends.quantized.engine}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--corpus", default="shakespeare", help="shakespeare (lm_corpus test split) or bbc-news")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--block", type=int, default=256, help="window length")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--gptq", action="store_true", help="add the GPTQ-style int4 g64 row")
    parser.add_argument("--calib", type=int, default=32, help="GPTQ calibration windows (train split)")
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    runtime.seed_everything(0)
    threads = runtime.set_threads(args.threads)
    device = runtime.pick_device(args.device)
    print(f"torch {torch.__version__}, device {device}, {threads} CPU threads")
    lm = lm_rows(args, device)
    print()
    print(quant.report_table(lm))
    print()
    enc = encoder_rows(args)
    print(quant.report_table(enc))
    print(f"dynamic int8 latency / fp32 latency on this CPU: {enc[1]['seconds'] / enc[0]['seconds']:.2f}")


if __name__ == "__main__":
    main()
