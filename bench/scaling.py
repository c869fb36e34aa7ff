"""Lab 8's figures: data-parallel throughput, ZeRO state per rank, checkpointing, MoE vs dense.

    .venv/bin/python bench/scaling.py [--steps 20] [--moe-steps 300]

- tokens/s of the course GPT (QUICK config: 4 layers, width 128, context 128, batch 8 per
  rank) at 1 and 2 gloo processes on this machine, bucketed all-reduce, one thread per
  process; efficiency = tokens/s at 2 / (2 x tokens/s at 1);
- Adam's state bytes per rank: unsharded, ZeRO-1 and ZeRO-2 (`llmlab.parallel.zero`), 2 ranks;
- peak tensor memory and time of forward + backward with and without checkpointed blocks;
- validation loss of a dense byte-level GPT and an MoE one (4 experts, k = 1, each as wide
  as the dense MLP: equal active parameters) after the same steps on Shakespeare.
Figures, not pass/fail.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from llmlab import data, runtime
from llmlab.model import GPT, GPTConfig
from llmlab.parallel import checkpointing, data_parallel, harness, moe, zero

CONFIG = GPTConfig()  # the default config (1.3M parameters)


def throughput(steps: int, batch: int) -> float:
    """tokens/s of this rank (step 0 is a warm-up)."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    data_parallel.broadcast_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randint(0, CONFIG.vocab_size, (batch, CONFIG.block_size), generator=g)
    for step in range(steps + 1):
        if step == 1:
            dist.barrier()
            start = time.perf_counter()
        opt.zero_grad()
        model(x, x)[1].backward()
        data_parallel.sync_gradients(model)
        opt.step()
    return steps * batch * CONFIG.block_size / (time.perf_counter() - start)


def zero_state(stage: int) -> int:
    """Optimizer-state bytes on this rank after one step (stage 0: plain Adam)."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    model(x, x)[1].backward()
    if stage == 0:
        opt = torch.optim.Adam(model.parameters())
        data_parallel.sync_gradients(model)
        opt.step()
        return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    opt = zero.ZeroAdam(model.parameters(), stage=stage)
    opt.step()
    return opt.state_bytes()


def checkpoint_cost(T: int, wrap: bool) -> tuple[float, float]:
    """(peak MiB, seconds) of one forward + backward, blocks checkpointed or not."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=512, n_layer=8, n_head=4, n_embd=128))
    if wrap:
        checkpointing.checkpoint_blocks(model)
    x = torch.randint(0, 256, (4, T))
    model(x, x)[1].backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with runtime.peak_memory() as m:
        model(x, x)[1].backward()
    seconds = []
    for _ in range(3):  # timed without the memory tracker, best of 3
        model.zero_grad(set_to_none=True)
        with runtime.timer() as t:
            model(x, x)[1].backward()
        seconds.append(t["seconds"])
    return m["bytes"] / 2**20, min(seconds)


def lm_loss(model: GPT, steps: int, train_ids: torch.Tensor, val_ids: torch.Tensor, aux: float) -> float:
    """Validation loss after `steps` AdamW steps of batch 32 x 64 bytes."""
    g = torch.Generator().manual_seed(0)
    T = model.config.block_size

    def batch(ids, gen):
        s = torch.randint(len(ids) - T - 1, (32,), generator=gen)
        return torch.stack([ids[i:i + T] for i in s]), torch.stack([ids[i + 1:i + 1 + T] for i in s])

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        _, loss = model(*batch(train_ids, g))
        if aux and moe.moe_layers(model):
            loss = loss + aux * moe.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return sum(model(*batch(val_ids, torch.Generator().manual_seed(i)))[1].item() for i in range(8)) / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--moe-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)

    # the best of 3 runs each, interleaved: the least disturbed by whatever else uses the cores
    one = two = 0.0
    for _ in range(3):
        one = max(one, harness.run(throughput, 1, args.steps, 8, timeout_s=600)[0])
        two = max(two, sum(harness.run(throughput, 2, args.steps, 8, timeout_s=600)))
    print(f"data parallel, {sum(p.numel() for p in GPT(CONFIG).parameters()):,}-parameter GPT, batch 8 x "
          f"{CONFIG.block_size} per rank:")
    print(f"  1 process {one:10,.0f} tokens/s   2 processes {two:10,.0f} tokens/s   efficiency {two / (2 * one):.0%}")

    print("Adam state bytes per rank (2 ranks):")
    for stage, label in ((0, "none"), (1, "ZeRO-1"), (2, "ZeRO-2")):
        per_rank = harness.run(zero_state, 2, stage)
        print(f"  {label:<7} " + "   ".join(f"rank {r}: {b:>10,}" for r, b in enumerate(per_rank)))

    print("activation checkpointing, 8 blocks, batch 4 (peak tensor memory, forward + backward time):")
    for T in (128, 256, 512):
        (pm, ps), (cm, cs) = checkpoint_cost(T, False), checkpoint_cost(T, True)
        print(f"  T={T:4d}  plain {pm:7.1f} MiB {ps * 1e3:7.1f} ms   checkpointed {cm:7.1f} MiB {cs * 1e3:7.1f} ms "
              f"({cm / pm:.0%} memory, {cs / ps:.2f}x time)")

    corpus = data.lm_corpus("shakespeare")
    as_ids = lambda texts, n: torch.frombuffer(bytearray("\n".join(texts)[:n].encode()), dtype=torch.uint8).long()  # noqa: E731
    train_ids, val_ids = as_ids(corpus["train"], 2_000_000), as_ids(corpus["val"], 200_000)
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
    print(f"MoE vs dense on Shakespeare bytes, {args.moe_steps} steps:")
    for label, make, aux in (("dense", lambda: GPT(cfg), 0.0),
                             ("MoE 4 experts, k=1, aux 0.01", lambda: moe.moe_gpt(cfg, 4, k=1), 0.01),
                             ("MoE 4 experts, k=1, no aux", lambda: moe.moe_gpt(cfg, 4, k=1), 0.0)):
        torch.manual_seed(0)
        model = make()
        loss = lm_loss(model, args.moe_steps, train_ids, val_ids, aux)
        total = sum(p.numel() for p in model.parameters())
        print(f"  {label:<30} active {moe.active_params(model):>8,}  total {total:>8,}  val loss {loss:.3f}")


if __name__ == "__main__":
    main()
