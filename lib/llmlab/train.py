"""The pretraining loop: AdamW, warmup + cosine, gradient accumulation, clipping, mixed
precision, evaluation with perplexity, checkpoints that resume exactly, and DDP.

Read top-down: TrainConfig -> the learning-rate schedule -> data -> one optimizer step
(`accumulate_gradients`) -> evaluation -> checkpoints -> distributed setup -> `train` ->
`plot_history`.

Data: `train` samples random blocks, nanoGPT-style, from either
- an object with `get_batch(split, batch_size, generator) -> (x, y)`, x and y (B, T) int64
  with y = x shifted left by one; split is "train" or "val"; or
- a torch Dataset whose items are (x, y) pairs of (T,) int64 tensors.
All randomness must come from `generator`: its state is the data position a checkpoint saves.

Distributed: launch the same script with `torchrun --nproc_per_node=N script.py`. `train`
sees WORLD_SIZE/RANK, joins the process group (nccl on CUDA, gloo on CPU), wraps the model
in DistributedDataParallel and draws different batches on each rank; gradients are averaged
across ranks once per optimizer step. Only rank 0 shows progress and writes checkpoints.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from llmlab.parallel import data_parallel
from llmlab.runtime import pick_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# ----------------------------------------------------------------------------------------
# Configuration

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    """Everything about a training run except the model and the data."""

    max_steps: int = 200  # optimizer steps to train for
    batch_size: int = 16  # sequences per micro-batch, per process
    grad_accum_steps: int = 1  # micro-batches per step: batch = batch_size * this * world size
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # floor of the cosine decay (often lr / 10)
    warmup_steps: int = 20  # linear warmup from ~0 to lr
    lr_decay_steps: int | None = None  # the cosine reaches min_lr here; None: max_steps
    weight_decay: float = 0.1  # AdamW's decoupled decay, on 2D weights only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    eval_interval: int = 50  # evaluate and checkpoint every this many steps and at the end; 0: no evals
    eval_steps: int = 10  # batches averaged per loss estimate
    amp: str = "auto"  # "auto": bf16 on CUDA with bf16, fp16 on older CUDA, fp32 elsewhere
    device: str = "auto"  # "auto" (cuda > mps > cpu), or "cpu", "cuda", "cuda:1", ...
    seed: int = 0  # seeds dropout and batch sampling (rank r uses seed + r)
    checkpoint: str | None = None  # file saved at each eval and at the end; training resumes from it
    resume: bool = True  # continue from `checkpoint` when the file exists
    progress: bool = True  # tqdm bar and eval lines (rank 0 only)

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "grad_accum_steps", "eval_steps")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr={self.min_lr} must not exceed lr={self.lr}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < self.warmup_steps:
            raise ValueError(f"TrainConfig.lr_decay_steps={self.lr_decay_steps} must be >= "
                             f"warmup_steps={self.warmup_steps}")
        if self.lr_decay_steps is None and self.max_steps < self.warmup_steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        self.betas = tuple(self.betas)
        if self.amp not in ("auto", *AMP_DTYPES):
            raise ValueError(f"TrainConfig.amp must be one of 'auto', 'bf16', 'fp16', 'fp32', got {self.amp!r}")


# ----------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup: lr * (step + 1) / warmup_steps, so the last warmup step uses the peak lr.
    Then a half cosine from lr down to min_lr at lr_decay_steps (default max_steps), and
    min_lr after that. Early Adam updates are noisy (its moment estimates are young):
    small steps first avoid a blow-up; the slow decay lets the loss settle at the end.
    """
    decay_steps = cfg.max_steps if cfg.lr_decay_steps is None else cfg.lr_decay_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (decay_steps - cfg.warmup_steps)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------
# Data


def sample_batch(data: Any, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x, y), each (batch_size, T) int64, from a `get_batch` object or a Dataset of (x, y)."""
    if hasattr(data, "get_batch"):
        return data.get_batch(split, batch_size, generator)
    rows = torch.randint(len(data), (batch_size,), generator=generator).tolist()
    xs, ys = zip(*(data[i] for i in rows))
    return torch.stack(xs), torch.stack(ys)


def to_device(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Move (x, y) to `device`; to a GPU through pinned memory, so the copy does not block."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


# ----------------------------------------------------------------------------------------
# One optimizer step


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `TrainConfig.amp` on `device` (fp32 means no autocast)."""
    cuda = device.type == "cuda"
    if amp == "auto":
        if not cuda:
            return torch.float32  # CPU autocast to bf16 is much slower than fp32 on most CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and not cuda:
        raise ValueError(f"TrainConfig.amp='fp16' needs a CUDA device, got {device}")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("TrainConfig.amp='bf16' but this GPU has no bf16; use 'fp16' or 'auto'")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed precision for the forward pass: matmuls in `dtype`, reductions in float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def accumulate_gradients(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], amp_dtype: torch.dtype = torch.float32,
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """Add to .grad the gradient of the mean loss over `batches`; return that loss (detached).

    Each micro-batch loss is divided by k = len(batches): gradients add up across backward
    calls, so k micro-batches of b sequences give the gradient of one batch of k*b. Under
    DDP, gradients are all-reduced only on the last micro-batch (`no_sync` on the others).
    """
    k = len(batches)
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        skip_sync = isinstance(model, DDP) and i < k - 1
        with model.no_sync() if skip_sync else nullcontext():
            with autocast(x.device, amp_dtype):
                _, loss = model(x, y)
            loss = loss / k
            # fp16 gradients underflow; the scaler multiplies the loss up (and the grads
            # back down before the optimizer step). Disabled, it passes the loss through.
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    return total


# ----------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def estimate_loss(
    model: nn.Module, data: Any, split: str, steps: int, batch_size: int, device: torch.device,
    amp_dtype: torch.dtype = torch.float32, seed: int = 0,
) -> float:
    """Mean loss over `steps` random batches of `split` (the same batches for the same seed).

    Under DDP each rank evaluates its own batches and the ranks average their estimates.
    """
    was_training = model.training
    model.eval()  # no dropout
    generator = torch.Generator().manual_seed(seed)  # private: training's data stream is untouched
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = sample_batch(data, split, batch_size, generator)
        x, y = to_device((x, y), device)
        with autocast(device, amp_dtype):
            _, loss = model(x, y)
        total += loss.float()
    model.train(was_training)
    if dist.is_initialized():
        data_parallel.allreduce_mean_([total])
    return total.item() / steps


# ----------------------------------------------------------------------------------------
# Checkpoints


def _rng_state(device: torch.device, data_generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device, data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save `state` atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `train` (tensors, numbers and strings only: weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this process created the process group, so it tears it down

    @property
    def is_master(self) -> bool:
        """Rank 0 logs and writes checkpoints."""
        return self.rank == 0


def setup_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by RANK/WORLD_SIZE, if any; return (info, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), pick_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, owns), dev


# ----------------------------------------------------------------------------------------
# The loop


def new_history() -> dict[str, list]:
    """Empty training record: per step, and per evaluation."""
    return {
        "step": [], "lr": [], "loss": [], "grad_norm": [],  # one entry per optimizer step
        "eval_step": [], "train_loss": [], "val_loss": [], "val_ppl": [],  # one per evaluation
        "tokens_per_s": [],  # throughput since the previous evaluation
    }


def train(
    model: nn.Module, train_data: Any, val_data: Any = None, cfg: TrainConfig | None = None,
) -> dict[str, list]:
    """Train `model` in place; return its history (losses, lr, grad norms, evals).

    Args:
        model: a GPT, or any module with `forward(x, y) -> (logits, loss)` and
            `configure_optimizers(weight_decay, lr, betas)`.
        train_data, val_data: see the module docstring. val_data is asked for split "val"
            and may be the same object as train_data, or None (no val loss).
        cfg: the run's TrainConfig (default: TrainConfig()).
    Returns:
        `new_history()`'s dict, filled in. A resumed run's history includes the steps
        before the checkpoint, and its per-step losses equal an uninterrupted run's.
    Side effect: reseeds torch's global RNG with cfg.seed (+ rank), for the dropout masks.
    """
    cfg = cfg or TrainConfig()
    info, device = setup_distributed(cfg.device)
    master = info.is_master
    model.to(device)
    model.train()
    amp_dtype = amp_dtype_for(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.betas)
    torch.manual_seed(cfg.seed + info.rank)  # dropout masks
    data_generator = torch.Generator().manual_seed(cfg.seed + info.rank)  # batch choice
    history, step = new_history(), 0

    if cfg.checkpoint and cfg.resume and Path(cfg.checkpoint).exists():
        ckpt = load_checkpoint(cfg.checkpoint)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == info.world_size:
            _set_rng_state(ckpt["rng"][info.rank], device, data_generator)
        elif master:
            tqdm.write(f"checkpoint has {len(ckpt['rng'])} ranks, this run {info.world_size}: fresh data order")
        step, history = ckpt["step"], ckpt["history"]
        if master and cfg.progress:
            tqdm.write(f"resumed from {cfg.checkpoint} at step {step}")

    # DDP broadcasts rank 0's weights now, and from here on averages gradients in backward.
    ddp_model = model
    if info.world_size > 1:
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    pending: list[tuple[int, float, Tensor, Tensor]] = []  # (step, lr, loss, grad_norm) not yet .item()'d
    tokens = 0
    clock = time.perf_counter()

    def flush() -> None:
        # Reading a GPU scalar waits for the GPU; do it only now and then, not every step.
        for s, lr, loss, norm in pending:
            history["step"].append(s)
            history["lr"].append(lr)
            history["loss"].append(loss.item())
            history["grad_norm"].append(norm.item())
        pending.clear()

    def evaluate() -> None:
        nonlocal tokens, clock
        flush()
        elapsed = time.perf_counter() - clock
        seed = cfg.seed + 10_000 + info.rank  # the same eval batches at every evaluation
        def loss_on(data: Any, split: str) -> float:
            return estimate_loss(model, data, split, cfg.eval_steps, cfg.batch_size, device, amp_dtype, seed)

        train_loss = loss_on(train_data, "train")
        val_loss = loss_on(val_data, "val") if val_data is not None else math.nan
        history["eval_step"].append(step)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["val_ppl"].append(math.exp(min(val_loss, 50.0)))  # perplexity = e^(mean NLL)
        history["tokens_per_s"].append(tokens / elapsed if tokens else math.nan)
        if master and cfg.progress:
            tqdm.write(f"step {step:>6} | train {train_loss:.4f} | val {val_loss:.4f} | "
                       f"ppl {history['val_ppl'][-1]:.2f} | {history['tokens_per_s'][-1]:.0f} tok/s")
        tokens, clock = 0, time.perf_counter()  # evaluation time does not count as training

    def checkpoint() -> None:
        nonlocal clock
        flush()
        started = time.perf_counter()
        rng = [None] * info.world_size  # every rank's RNG state, so each resumes its own stream
        if info.world_size > 1:
            dist.all_gather_object(rng, _rng_state(device, data_generator))
        else:
            rng[0] = _rng_state(device, data_generator)
        if master:
            save_checkpoint(cfg.checkpoint, {
                "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng, "history": history, "train_config": asdict(cfg),
                "model_config": asdict(model.config) if is_dataclass(getattr(model, "config", None)) else None,
            })
        clock += time.perf_counter() - started  # saving does not count as training either

    if cfg.eval_interval and step == 0:
        evaluate()  # the loss at init: ~ln(vocab_size) for a fresh model
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not (master and cfg.progress))
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [
            to_device(sample_batch(train_data, "train", cfg.batch_size, data_generator), device)
            for _ in range(cfg.grad_accum_steps)
        ]
        loss = accumulate_gradients(ddp_model, batches, amp_dtype, scaler)
        scaler.unscale_(optimizer)  # true gradients (a no-op without fp16), then clip them
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: only measure the norm
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)  # skipped if fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += sum(x.numel() for x, _ in batches) * info.world_size
        pending.append((step, lr, loss, grad_norm.detach()))
        bar.update(1)
        if step % 10 == 0 or step == cfg.max_steps:
            flush()
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", lr=f"{lr:.2e}")
        last = step == cfg.max_steps
        due = cfg.eval_interval and (step % cfg.eval_interval == 0 or last)
        if due:
            evaluate()
        if cfg.checkpoint and (due or last):
            checkpoint()
    bar.close()
    flush()
    if info.owns_group:
        dist.destroy_process_group()
    return history


# ----------------------------------------------------------------------------------------
# Plot


def plot_history(history: dict[str, list]) -> "Figure":
    """Two panels: loss per step (with evaluations and the learning rate) and perplexity."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_loss.plot(history["step"], history["loss"], color="C0", alpha=0.35, lw=1, label="train (batch)")
    if history["eval_step"]:
        ax_loss.plot(history["eval_step"], history["train_loss"], "o-", color="C0", ms=3, label="train (eval)")
        if not all(math.isnan(v) for v in history["val_loss"]):
            ax_loss.plot(history["eval_step"], history["val_loss"], "o-", color="C1", ms=3, label="val")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_lr = ax_loss.twinx()
    ax_lr.plot(history["step"], history["lr"], color="gray", ls="--", lw=1)
    ax_lr.set_ylabel("learning rate", color="gray")
    ax_lr.tick_params(axis="y", colors="gray")

    evals = history["eval_step"]
    has_val = evals and not all(math.isnan(v) for v in history["val_loss"])
    losses = history["val_loss"] if has_val else history["train_loss"]
    ax_ppl.plot(evals, [math.exp(min(v, 50.0)) for v in losses], "o-", color="C1" if has_val else "C0", ms=3)
    ax_ppl.set_yscale("log")
    ax_ppl.set_xlabel("step")
    ax_ppl.set_ylabel(f"{'val' if has_val else 'train'} perplexity")
    ax_ppl.set_title("perplexity = exp(loss): the effective number of choices per token", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# Hugging Face models in the same loop


class HFCausalLM(nn.Module):
    """Wraps a Hugging Face causal LM so `train` can drive it: forward(x, y) -> (logits, loss).

    y holds the next tokens already (y[t] follows x[t]) with IGNORE_INDEX where no loss is
    wanted (prompt tokens, padding); x positions whose y is IGNORE_INDEX past the last real
    token are padding, and `pad_id` marks them for the attention mask.
    """

    def __init__(self, model: nn.Module, pad_id: int | None = None):
        super().__init__()
        self.model = model
        self.pad_id = pad_id

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x, y (B, T) -> logits (B, T, V) and the mean cross-entropy over non-ignored targets."""
        from llmlab.model import IGNORE_INDEX

        mask = None if self.pad_id is None else (x != self.pad_id).long()
        logits = self.model(input_ids=x, attention_mask=mask).logits
        loss = None
        if y is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def configure_optimizers(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
    ) -> torch.optim.AdamW:
        """AdamW over the trainable parameters only (e.g. LoRA's), decay on 2D weights."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ----------------------------------------------------------------------------------------
# The course's own base model: what lab 2 trains, built reproducibly as asset `course-gpt`


def course_gpt_recipe(vocab_size: int, quick: bool, seed: int = 0, device: str = "auto") -> tuple["GPTConfig", TrainConfig]:
    """Model and training configs of lab 2's GPT: ~0.3M parameters in QUICK mode, ~11M in full."""
    from llmlab.model import GPTConfig

    if quick:  # seconds on a laptop CPU
        config = GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=96)
        cfg = TrainConfig(max_steps=400, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                          eval_interval=100, eval_steps=5, device=device, seed=seed)
    else:  # minutes on a GPU
        config = GPTConfig(vocab_size=vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.1)
        cfg = TrainConfig(max_steps=3000, batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                          eval_interval=250, eval_steps=20, device=device, seed=seed)
    return config, cfg


def build_course_gpt(folder: str | Path, quick: bool = False, seed: int = 0, device: str = "auto") -> None:
    """Pretrain lab 2's GPT on Shakespeare and save it as a Llama checkpoint + chat tokenizer in `folder`.

    Same seed and device -> the same weights. The tokenizer has ChatML's <|im_start|> and
    <|im_end|> as special tokens and a chat template, so lab 3 can instruction-tune it.
    """
    import json

    from llmlab import data, runtime, tokenizer
    from llmlab.model import GPT, save_hf

    runtime.seed_everything(seed)
    corpus = data.lm_corpus("shakespeare", seed=seed)
    bpe = tokenizer.train_bpe(corpus["train"], 512 if quick else 4096, special_tokens=tokenizer.CHAT_SPECIALS)
    eot = bpe.token_to_id(tokenizer.EOT)
    config, cfg = course_gpt_recipe(bpe.get_vocab_size(), quick, seed, device)
    blocks = {split: data.TokenBlocks.from_texts(corpus[split], bpe, config.block_size, eot)
              for split in ("train", "val")}
    model = GPT(config)
    history = train(model, blocks["train"], blocks["val"], cfg)
    save_hf(model.cpu(), tokenizer.to_hf(bpe, chat_template=tokenizer.CHATML_TEMPLATE), folder)
    summary = {"quick": quick, "seed": seed, "params": model.num_params(), "config": asdict(config),
               "steps": cfg.max_steps, "val_loss": history["val_loss"][-1]}
    (Path(folder) / "llmlab-train.json").write_text(json.dumps(summary, indent=1))

