"""llmlab.parallel against torch's own: DDP, GradScaler, ZeroRedundancyOptimizer, autograd, Hugging Face."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from llmlab.model import GPT, GPTConfig
from llmlab.parallel import checkpointing, data_parallel, harness, loss_scaling, memory, moe, zero

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY))


def batch(seed: int, B: int = 4, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY["vocab_size"], (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


# ---------------------------------------------------------------------------- harness


def rank_and_sum(offset):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t}


@pytest.mark.parametrize("store", ["file", "tcp"])
def test_run_returns_each_ranks_value_in_order(store):
    out = harness.run(rank_and_sum, 3, 10, store=store)
    assert [o["rank"] for o in out] == [0, 1, 2] and all(o["world"] == 3 for o in out)
    assert all(o["sum"].item() == 33.0 for o in out)


def fails_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("bad shard")
    dist.barrier()  # rank 0 would wait here forever without rank 1
    return 0


def hangs_on_rank_zero():
    if dist.get_rank() == 0:
        dist.recv(torch.zeros(1), src=1)  # rank 1 never sends...
    else:
        dist.barrier()  # ...it waits in a collective rank 0 never joins
    return 0


def test_a_failing_rank_raises_its_error_and_stops_the_others():
    with pytest.raises(ValueError, match="rank 1: bad shard"):
        harness.run(fails_on_rank_one, 2, timeout_s=30)


def test_a_hang_is_a_timeout_not_a_stuck_process():
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] did not finish within 3 s"):
        harness.run(hangs_on_rank_zero, 2, timeout_s=3)


# ---------------------------------------------------------------------------- memory


def test_state_bytes_match_a_real_adam_step():
    model = tiny_gpt()
    opt = torch.optim.Adam(model.parameters())
    _, loss = model(*batch(0))
    loss.backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    measured = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in model.parameters())
    measured += sum(v.numel() * v.element_size() for s in opt.state.values() for key, v in s.items() if key != "step")
    assert memory.bytes_per_device(n, mixed_precision=False) == measured == 16 * n


def test_zero_stages_and_70b_plan():
    P = 70e9
    assert memory.bytes_per_device(P) == 16 * P
    assert memory.bytes_per_device(P, 1, dp=64) == pytest.approx(P * (4 + 12 / 64))
    assert memory.bytes_per_device(P, 3, dp=64, tp=8) == pytest.approx(16 * P / 512)
    gpu = 80e9
    assert memory.min_data_parallel(P, gpu, 0) is None  # 1.12 TB never fits on one device
    assert memory.min_data_parallel(P, gpu, 1) is None  # 4 bytes/param of weights+grads: 280 GB
    assert memory.min_data_parallel(P, gpu, 3) == 14
    assert memory.min_data_parallel(P, gpu, 2, tp=8) == math.ceil(P / 8 * 14 / (gpu - P / 8 * 2))


# ---------------------------------------------------------------------------- loss scaling


SCRIPT = [1.0, float("inf"), 2.0, 3.0, float("nan"), 1.0, 1.0, 1.0, 5.0, float("inf"), 1.0, 1.0, 1.0, 1.0]


def test_scaler_takes_gradscalers_decisions_on_inf_and_nan():
    kwargs = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    ref_p, my_p = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ref_opt, my_opt = torch.optim.SGD([ref_p], lr=0.1), torch.optim.SGD([my_p], lr=0.1)
    ref, mine = torch.amp.GradScaler("cpu", **kwargs), loss_scaling.DynamicLossScaler(**kwargs)
    for g in SCRIPT:
        direction = torch.tensor([g, 1.0, -2.0])
        for p, opt, scaled in ((ref_p, ref_opt, ref.scale), (my_p, my_opt, mine.scale_loss)):
            opt.zero_grad()
            scaled((p * direction).sum()).backward()
        ref.step(ref_opt)
        ref.update()
        mine.unscale_([my_p])
        mine.step(my_opt)
        assert mine.update() == ref.get_scale()
        assert torch.equal(my_p, ref_p)
    assert ref.get_scale() != 2.0**10  # the script both backed off and grew


def test_fp16_underflows_without_scaling():
    g = torch.tensor(1e-8)
    assert g.half().item() == 0.0 and (g * 2**16).half().float().item() / 2**16 == pytest.approx(1e-8, rel=1e-2)


# ---------------------------------------------------------------------------- checkpointing


def test_checkpointed_blocks_give_identical_gradients_and_save_memory():
    from llmlab import runtime

    grads, peaks = [], []
    for wrap in (False, True):
        model = tiny_gpt()
        if wrap:
            checkpointing.checkpoint_blocks(model)
        x, y = batch(1, B=8)
        with runtime.peak_memory() as m:
            _, loss = model(x, y)
            loss.backward()
        peaks.append(m["bytes"])
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert peaks[1] < peaks[0]


def test_checkpointing_replays_dropout():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, dropout=0.3))
    x, y = batch(2)
    torch.manual_seed(5)
    model(x, y)[1].backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    checkpointing.checkpoint_blocks(model)
    torch.manual_seed(5)
    model(x, y)[1].backward()
    assert all(torch.allclose(p.grad, w, atol=1e-6) for p, w in zip(model.parameters(), want))


# ---------------------------------------------------------------------------- data parallel


def train_steps(bucket_bytes, use_ddp, steps=3):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_gpt(seed=rank)  # different on purpose: the broadcast must fix it
    if use_ddp:
        net = nn.parallel.DistributedDataParallel(model)
    else:
        data_parallel.broadcast_parameters(model)
        net = model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        x, y = batch(100 + step, B=8)
        shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.zero_grad()
        net(x[shard], y[shard])[1].backward()
        if not use_ddp:
            data_parallel.sync_gradients(model, bucket_bytes)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bucket_bytes", [None, 4096])
def test_data_parallel_equals_one_process_and_ddp(bucket_bytes):
    model = tiny_gpt(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        opt.zero_grad()
        model(*batch(100 + step, B=8))[1].backward()
        opt.step()
    mine = harness.run(train_steps, 2, bucket_bytes, False)
    ddp = harness.run(train_steps, 2, bucket_bytes, True)
    for key, want in model.state_dict().items():
        for got in (mine[0][key], mine[1][key], ddp[0][key]):
            assert torch.allclose(got, want, atol=1e-6), key


def test_buckets_are_greedy_and_in_order():
    assert data_parallel.make_buckets([4, 4, 4, 20, 4], 8) == [[0, 1], [2], [3], [4]]


# ---------------------------------------------------------------------------- ZeRO


def zero_vs_zero_redundancy(stage, steps=4):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank = dist.get_rank()
    mine, ref = tiny_gpt(), tiny_gpt()
    opt = zero.ZeroAdam(mine.parameters(), lr=1e-2, weight_decay=0.1, stage=stage)
    ref_opt = ZeroRedundancyOptimizer(ref.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        x, y = batch(10 * step + rank, B=4)
        mine(x, y)[1].backward()
        ref(x, y)[1].backward()
        for p in ref.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    ref_bytes = sum(v.numel() * v.element_size() for s in ref_opt.optim.state.values()
                    for k, v in s.items() if k != "step")
    return {"mine": mine.state_dict(), "ref": ref.state_dict(), "bytes": opt.state_bytes(), "ref_bytes": ref_bytes,
            "grad_shard": opt.grad_shard.numel()}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_zero_redundancy_optimizer_and_halves_state(stage):
    out = harness.run(zero_vs_zero_redundancy, 2, stage)
    n = sum(p.numel() for p in tiny_gpt().parameters())
    for r in out:
        for key, want in r["ref"].items():
            assert torch.allclose(r["mine"][key], want, atol=1e-5), key
        assert r["bytes"] == 8 * math.ceil(n / 2)  # exactly half of Adam's 8 bytes per parameter
        assert r["grad_shard"] == math.ceil(n / 2)
    assert abs(out[0]["ref_bytes"] - out[1]["ref_bytes"]) < 8 * n  # ZeroRedundancy shards whole tensors
    assert out[0]["bytes"] + out[1]["bytes"] == pytest.approx(out[0]["ref_bytes"] + out[1]["ref_bytes"], rel=1e-3)


# ---------------------------------------------------------------------------- MoE


def test_routing_and_aux_loss_match_hugging_face_mixtral():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(40, 6)
    for k in (1, 2):
        assert torch.allclose(moe.load_balancing_loss(logits, k), load_balancing_loss_func((logits,), 6, k), atol=1e-6)
    weights, experts = moe.top_k_routing(logits, 2)
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(experts, top.indices)
    assert torch.allclose(weights, top.values / top.values.sum(-1, keepdim=True))
    assert moe.load_balancing_loss(torch.zeros(8, 4), 1) == pytest.approx(1.0)  # uniform routing


def test_capacity_drops_the_latest_assignments():
    experts = torch.tensor([[1, 2], [0, 2], [1, 2], [1, 0], [2, 1], [0, 1]])
    keep = moe.capacity_mask(experts, 3, 3)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, True], [True, False], [True, False]]
    assert moe.expert_capacity(6, 3, 2, 1.0) == 4 and moe.expert_capacity(10, 4, 1, 1.25) == 4


def test_moe_mlp_equals_a_per_token_loop_and_trains_in_the_gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY)
    layer = moe.MoEMLP(cfg, n_experts=4, k=2, capacity_factor=None)
    x = torch.randn(2, 5, cfg.n_embd)
    out = layer(x)
    tokens = x.reshape(10, -1)
    weights, experts = moe.top_k_routing(layer.router(tokens), 2)
    want = torch.stack([sum(w * layer.experts[e](t[None])[0] for w, e in zip(weights[i], experts[i]))
                        for i, t in enumerate(tokens)])
    assert torch.allclose(out.reshape(10, -1), want, atol=1e-6)
    model = moe.moe_gpt(cfg, n_experts=4, k=1)
    dense = GPT(cfg)
    per_expert = sum(p.numel() for p in moe.moe_layers(model)[0].experts[0].parameters())
    router = sum(m.router.weight.numel() for m in moe.moe_layers(model))
    assert moe.active_params(model) == sum(p.numel() for p in dense.parameters()) + router
    assert sum(p.numel() for p in model.parameters()) == moe.active_params(model) + 3 * per_expert * cfg.n_layer
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        _, loss = model(*batch(0, B=8))
        (loss + 0.01 * moe.aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
