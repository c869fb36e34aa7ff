"""Training throughput: `llmlab.train.train` vs a plain nanoGPT-style loop, same model and data.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--repeats 3] [--threads N]
    python bench/train_throughput.py --device cuda --model gpt2 --batch 8 --steps 20     # on a GPU

Model: by default `GPTConfig()`'s defaults (4 layers, width 128, 4 heads, vocab 4096, context
128; the script prints its parameter count), batch 16 x 128 tokens, fp32 on CPU; `--model gpt2`
is a 124M GPT-2-sized one for GPUs. Rows:
- plain loop: forward, backward, `torch.optim.AdamW(model.parameters())` step; no schedule,
  accumulation, clipping or AMP (nanoGPT's loop with its extras switched off);
- plain loop + fused AdamW: the same with `fused=True`, which `configure_optimizers` uses;
- llmlab.train: the full loop (schedule, clipping, grad-norm logging, AMP choice), no evals;
  on CUDA also with amp="fp32", the loop's own cost without mixed precision.
Runs are interleaved and repeated; the best and median tokens/s of each are printed. Each
timed run includes its first (slower) step. Figures, not pass/fail.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmlab.model import GPT, GPTConfig
from llmlab.runtime import pick_device
from llmlab.train import TrainConfig, train

MODELS = {
    "small": GPTConfig(),  # GPTConfig's defaults: a CPU-sized model (larger than lab 2's QUICK recipe)
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),  # ~124M, GPU only
}


class RandomTokens:
    """Uniformly random tokens: throughput does not depend on what is learned."""

    def __init__(self, vocab_size: int, block_size: int, n: int = 200_000):
        self.data = torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        self.block_size = block_size

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        starts = torch.randint(len(self.data) - self.block_size, (batch_size,), generator=generator)
        x = torch.stack([self.data[s:s + self.block_size] for s in starts])
        y = torch.stack([self.data[s + 1:s + 1 + self.block_size] for s in starts])
        return x, y


def plain_loop(data: RandomTokens, config: GPTConfig, batch: int, steps: int, device: torch.device,
               fused: bool) -> float:
    """nanoGPT's inner loop, nothing else; returns tokens/s."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=fused or None)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = data.get_batch("train", batch, generator)
        _, loss = model(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # wait for the device
    return steps * batch * data.block_size / (time.perf_counter() - start)


def llmlab_loop(data: RandomTokens, config: GPTConfig, batch: int, steps: int, device: torch.device,
                amp: str = "auto") -> float:
    """`llmlab.train.train` on the same model; returns tokens/s."""
    torch.manual_seed(0)
    model = GPT(config)
    cfg = TrainConfig(max_steps=steps, batch_size=batch, warmup_steps=min(10, steps), eval_interval=0,
                      amp=amp, device=str(device), progress=False)
    start = time.perf_counter()
    train(model, data, None, cfg)
    return steps * batch * data.block_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--model", choices=sorted(MODELS), default="small", help="small (default) or gpt2 (GPU)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = MODELS[args.model]
    data = RandomTokens(config.vocab_size, config.block_size)
    print(f"model: {GPT(config).num_params() / 1e6:.2f}M params, batch {args.batch} x {config.block_size} tokens, "
          f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} steps x {args.repeats} runs")
    runs = {
        "plain loop (AdamW default)": lambda steps: plain_loop(data, config, args.batch, steps, device, fused=False),
        "plain loop + fused AdamW": lambda steps: plain_loop(data, config, args.batch, steps, device, fused=True),
        "llmlab.train": lambda steps: llmlab_loop(data, config, args.batch, steps, device),
    }
    if device.type == "cuda":  # amp="auto" is bf16 there: show the loop's own cost apart from AMP's
        runs["llmlab.train amp=fp32"] = lambda steps: llmlab_loop(data, config, args.batch, steps, device, amp="fp32")
    results: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # one short untimed run of each: allocator, kernels, caches
        run(2)
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved, so background load hits all alike
            results[name].append(run(args.steps))
    print(f"{'loop':<30} {'best tok/s':>11} {'median tok/s':>13}")
    for name, values in results.items():
        print(f"{name:<30} {max(values):>11.0f} {statistics.median(values):>13.0f}")


if __name__ == "__main__":
    main()
