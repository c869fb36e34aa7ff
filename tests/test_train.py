"""llmlab.train: the schedule, gradient accumulation, clipping, AMP choice, exact resume
from a checkpoint, and two-process DDP with gloo (torchrun)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from llmlab import model as M
from llmlab import train as T

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)


class Tokens:
    """A token stream with a learnable rule (each token mostly = previous + 1), split 90/10."""

    def __init__(self, n: int = 4000, vocab_size: int = 32, block_size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        steps = torch.where(torch.rand(n, generator=g) < 0.9, 1, torch.randint(0, vocab_size, (n,), generator=g))
        stream = torch.cumsum(steps, 0) % vocab_size
        cut = int(0.9 * n)
        self.splits = {"train": stream[:cut], "val": stream[cut:]}
        self.block_size = block_size

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)
        x = torch.stack([data[s:s + self.block_size] for s in starts])
        y = torch.stack([data[s + 1:s + 1 + self.block_size] for s in starts])
        return x, y


class Blocks(torch.utils.data.Dataset):
    """The same stream as a Dataset of (x, y) blocks."""

    def __init__(self, tokens: Tokens, split: str):
        data, T_ = tokens.splits[split], tokens.block_size
        self.items = [(data[i:i + T_], data[i + 1:i + 1 + T_]) for i in range(0, len(data) - T_ - 1, T_)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are fastest on one thread, and a second thread waiting for a busy core
    # makes them several times slower on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> M.GPT:
    torch.manual_seed(seed)
    return M.GPT(M.GPTConfig(**{**TINY, **overrides}))


def quick(**overrides) -> T.TrainConfig:
    base = dict(max_steps=8, batch_size=4, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_interval=4,
                eval_steps=2, device="cpu", progress=False)
    return T.TrainConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------------------
# Config and schedule


@pytest.mark.parametrize("overrides,field", [
    (dict(max_steps=0), "max_steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(lr=0.0), "lr"),
    (dict(min_lr=1.0, lr=0.1), "min_lr"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=50, max_steps=10), "warmup_steps"),
    (dict(lr_decay_steps=5, warmup_steps=10), "lr_decay_steps"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(amp="int8"), "amp"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        T.TrainConfig(**overrides)


def test_lr_schedule_values():
    cfg = T.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert T.lr_at(0, cfg) == pytest.approx(1e-4)  # 1/10 of the peak
    assert T.lr_at(4, cfg) == pytest.approx(5e-4)  # linear
    assert T.lr_at(9, cfg) == pytest.approx(1e-3)  # last warmup step: the peak
    assert T.lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert T.lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway: the midpoint of lr and min_lr
    assert T.lr_at(110, cfg) == pytest.approx(1e-4) and T.lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [T.lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    longer = T.TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=50, lr_decay_steps=100)
    assert T.lr_at(50, longer) == pytest.approx(5e-4)  # the schedule follows lr_decay_steps


def test_amp_choice_on_cpu():
    cpu = torch.device("cpu")
    assert T.amp_dtype_for("auto", cpu) == torch.float32
    assert T.amp_dtype_for("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        T.amp_dtype_for("fp16", cpu)


# ----------------------------------------------------------------------------------------
# One step


def test_gradient_accumulation_equals_one_big_batch():
    model = tiny_model(dropout=0.0)
    x, y = Tokens().get_batch("train", 8, torch.Generator().manual_seed(0))
    _, loss = model(x, y)  # the reference: one batch of 8, plain backward
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    micro = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]  # k=4 micro-batches of b=2
    accumulated_loss = T.accumulate_gradients(model, micro)
    assert accumulated_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-6, rtol=0, msg=name)


def test_gradients_are_clipped_before_the_step():
    norms = []

    def record(optimizer, *_):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        history = T.train(tiny_model(), Tokens(), None, quick(max_steps=3, eval_interval=0, grad_clip=0.05))
    finally:
        handle.remove()
    assert len(norms) == 3
    assert all(n == pytest.approx(0.05, rel=1e-4) for n in norms)  # clipped exactly to max_norm
    assert all(n > 0.05 for n in history["grad_norm"])  # the recorded norm is the one before clipping


# ----------------------------------------------------------------------------------------
# The loop


def test_train_learns_and_records_history():
    model = tiny_model()
    history = T.train(model, Tokens(), Tokens(), quick(max_steps=40, eval_interval=20, batch_size=8))
    assert history["step"] == list(range(1, 41))
    assert history["eval_step"] == [0, 20, 40]
    assert history["lr"][0] == pytest.approx(1.5e-3) and history["lr"][-1] > 3e-4
    first, last = history["val_loss"][0], history["val_loss"][-1]
    assert abs(first - math.log(32)) < 0.1  # ~ln(vocab) at init
    assert last < first - 1.0  # it learned the +1 rule
    assert history["val_ppl"][-1] == pytest.approx(math.exp(last))
    assert next(model.parameters()).device.type == "cpu"


def test_train_accepts_a_dataset_of_blocks():
    tokens = Tokens()
    history = T.train(tiny_model(), Blocks(tokens, "train"), Blocks(tokens, "val"), quick(max_steps=4))
    assert len(history["loss"]) == 4 and all(math.isfinite(v) for v in history["val_loss"])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # Dropout on, so the torch RNG state matters as much as the data position.
    cfg = dict(max_steps=8, lr_decay_steps=8, grad_accum_steps=2, eval_interval=2)
    straight = T.train(tiny_model(dropout=0.1), Tokens(), Tokens(), quick(**cfg))

    path = tmp_path / "ckpt.pt"
    T.train(tiny_model(dropout=0.1), Tokens(), Tokens(), quick(**{**cfg, "max_steps": 5}, checkpoint=str(path)))
    assert T.load_checkpoint(path)["step"] == 5  # saved at the end, not only at evals
    resumed_model = tiny_model(seed=123, dropout=0.1)  # different init: the checkpoint must win
    resumed = T.train(resumed_model, Tokens(), Tokens(), quick(**cfg, checkpoint=str(path)))

    assert resumed["step"] == straight["step"]
    assert resumed["loss"] == straight["loss"]  # bit for bit
    assert resumed["grad_norm"] == straight["grad_norm"]
    # The interrupted run also evaluated where it stopped (step 5); every other evaluation agrees.
    assert straight["eval_step"] == [0, 2, 4, 6, 8] and resumed["eval_step"] == [0, 2, 4, 5, 6, 8]
    evals = dict(zip(resumed["eval_step"], resumed["val_loss"]))
    assert [evals[s] for s in straight["eval_step"]] == straight["val_loss"]


def test_plot_history():
    import matplotlib

    matplotlib.use("Agg")
    history = T.train(tiny_model(), Tokens(), Tokens(), quick(max_steps=4, eval_interval=2))
    fig = T.plot_history(history)
    assert len(fig.axes) == 3  # loss, its lr twin, perplexity


# ----------------------------------------------------------------------------------------
# DDP: two processes under torchrun, gloo on CPU

DDP_SCRIPT = """
import hashlib, os, sys, torch
sys.path.insert(0, {tests!r})
from test_train import Tokens, tiny_model, quick
from llmlab import train as T

out = sys.argv[1]
model = tiny_model()
history = T.train(model, Tokens(), Tokens(), quick(max_steps=4, eval_interval=2, grad_accum_steps=2,
                                                   checkpoint=os.path.join(out, "ckpt.pt")))
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.numpy().tobytes())
rank = os.environ["RANK"]
with open(os.path.join(out, f"rank{{rank}}.txt"), "w") as f:
    f.write(f"{{digest.hexdigest()}} {{history['loss'][0]!r}} {{os.environ['WORLD_SIZE']}}")
"""


def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert rank0[2] == rank1[2] == "2"
    assert rank0[0] == rank1[0]  # same weights: gradients were averaged
    assert rank0[1] != rank1[1]  # from different data: each rank drew its own batches
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 4  # written by rank 0
    assert len(T.load_checkpoint(tmp_path / "ckpt.pt")["rng"]) == 2


@pytest.mark.slow
def test_course_gpt_build_is_reproducible_and_loads_as_llama(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.train import build_course_gpt

    for name in ("a", "b"):
        build_course_gpt(tmp_path / name, quick=True, seed=0, device="cpu")
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed -> same weights"
    summary = json.loads((tmp_path / "a" / "llmlab-train.json").read_text())
    assert summary["quick"] and summary["val_loss"] < 4.5  # well below ln(512) = 6.24
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    text = tok.apply_chat_template([{"role": "user", "content": "Hail!"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHail!<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(ids[0, :1].tolist()) == ["<|im_start|>"], "chat markers are single tokens"
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
