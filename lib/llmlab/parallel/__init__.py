"""Training past one device (lab 8): the reference for what the lab has students build.

One module per idea, each readable on its own:
- `memory`: bytes per parameter, ZeRO stages and 3D plans, how many devices a model needs;
- `loss_scaling`: dynamic loss scaling for fp16 (the decisions of `torch.amp.GradScaler`);
- `checkpointing`: activation checkpointing of the course GPT's blocks, wrapped from outside;
- `data_parallel`: gradient all-reduce, naive and bucketed, and a data-parallel step;
- `zero`: ZeRO stage 1 and 2, a sharded Adam over flat parameter shards;
- `moe`: top-k routing, the load-balancing loss, capacity, an MoE MLP for the course GPT;
- `harness`: not an answer but the lab's bench: run a function on N gloo processes on one
  machine (fork, a FileStore or 127.0.0.1, a deadline), so the exercises run for real.
"""
from llmlab.parallel import checkpointing, data_parallel, harness, loss_scaling, memory, moe, zero  # noqa: F401

# What a lab-8 exercise must not call: each module rebuilds one exercise (the harness is the bench).
ANSWER_MODULES = [f"llmlab.parallel.{m}" for m in
                  ("memory", "loss_scaling", "checkpointing", "data_parallel", "zero", "moe")]
