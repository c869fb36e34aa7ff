"""llmlab.model: config validation, shapes, the loss at init, learning, the forward with a KV
cache and left padding, and the exact Hugging Face Llama export (logits and greedy tokens
against `transformers`)."""
from __future__ import annotations

import math

import pytest
import torch

from llmlab import model as M
from llmlab import tokenizer as tk
from llmlab.kvcache import KVCache

TINY = dict(vocab_size=67, block_size=24, n_layer=2, n_head=4, n_embd=32)


pytestmark = pytest.mark.usefixtures("seeded_one_thread")


def tiny(**overrides) -> M.GPT:
    return M.GPT(M.GPTConfig(**{**TINY, **overrides}))


def scramble(model: M.GPT) -> M.GPT:
    """Give every weight (norm gains and biases too) a visible random value.

    A fresh model has unit norm gains and zero biases, under which a wrong export (a
    missing gain, a transposed matrix) could still pass; random values cannot hide them.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.2 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("overrides,field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_embd=12, n_head=4), "even"),  # head_dim 3: RoPE rotates pairs
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(block_size=2.5), "block_size"),
    (dict(position="alibi"), "position"),
    (dict(mlp="relu"), "mlp"),
    (dict(dropout=1.0), "dropout"),
    (dict(hidden_dim=0), "hidden_dim"),
    (dict(rope_theta=0.0), "rope_theta"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        M.GPTConfig(**{**TINY, **overrides})


def test_config_defaults():
    c = M.GPTConfig()
    assert c.hidden_dim == 352 and c.head_dim == 32  # 8/3 * 128 rounded up to a multiple of 32
    assert M.GPTConfig(n_embd=64, n_head=2, mlp="gelu").hidden_dim == 256
    assert M.GPTConfig(n_embd=12, n_head=4, position="learned").head_dim == 3  # odd is fine without RoPE
    assert 1.2e6 < M.GPT(c).num_params() < 1.4e6  # the 1.3M-parameter QUICK model


# ----------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("variant", [{}, dict(position="learned", mlp="gelu", bias=True)])
def test_forward_shapes(variant):
    model = tiny(**variant)
    idx = torch.randint(0, 67, (3, 24))
    logits, loss = model(idx)
    assert logits.shape == (3, 24, 67) and loss is None
    logits, loss = model(idx[:, :5], idx[:, 1:6])
    assert logits.shape == (3, 5, 67) and loss.shape == ()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_is_causal():
    model = tiny().eval()
    idx = torch.randint(0, 67, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 67  # change the future only
    torch.testing.assert_close(model(idx)[0][:, :10], model(changed)[0][:, :10], atol=1e-6, rtol=0)


def test_loss_at_init_is_log_vocab():
    model = tiny(vocab_size=1000)
    idx, targets = torch.randint(0, 1000, (8, 24)), torch.randint(0, 1000, (8, 24))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(1000)) < 0.05  # uniform prediction: -log(1/V)


def test_ignore_index_targets_are_skipped():
    model = tiny()
    idx, targets = torch.randint(0, 67, (2, 8)), torch.randint(0, 67, (2, 8))
    logits, loss = model(idx, targets)
    masked = targets.clone()
    masked[:, 4:] = M.IGNORE_INDEX
    _, partial = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 67), targets[:, :4].reshape(-1))
    torch.testing.assert_close(partial, expected)


def test_weights_are_tied_and_counted_once():
    model = tiny()
    assert model.lm_head.weight is model.embed_tokens.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    assert model.num_params(non_embedding=True) == model.num_params() - 67 * 32


def test_configure_optimizers_decays_only_matrices():
    model = tiny(bias=True)
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("variant", [{}, dict(position="learned", mlp="gelu")])
def test_overfits_one_batch(variant):
    model = tiny(dropout=0.0, **variant)
    data = torch.randint(0, 67, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    opt = model.configure_optimizers(weight_decay=0.0, lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # 64 random tokens memorised


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 67, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


# ----------------------------------------------------------------------------------------
# The forward with a KV cache (past_key_values), an attention mask and positions


@pytest.mark.parametrize("variant", [{}, dict(position="learned", mlp="gelu")])
def test_forward_with_a_cache_equals_the_full_forward(variant):
    model = scramble(tiny(**variant)).eval()
    idx = torch.randint(0, 67, (2, 20))
    cache = KVCache()
    with torch.no_grad():
        full = model(idx)[0]
        chunks = [model(idx[:, a:b], past_key_values=cache)[0] for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert cache.get_seq_length() == 20 and cache.keys[1].shape == (2, 4, 20, 8)
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="sequence length 25 exceeds block_size=24"):
        model(idx[:, :5], past_key_values=cache)


def test_left_padding_with_mask_and_positions_equals_each_row_alone():
    from llmlab.generate import decoder_mask, left_pad, position_ids

    model = scramble(tiny()).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=decoder_mask(mask, 6), position_ids=position_ids(mask, 6))[0]
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0][0]
            assert torch.allclose(batched[row, 6 - len(p):], alone, atol=1e-5)


def test_hf_greedy_generation_matches():
    model = scramble(tiny()).eval()
    hf = M.to_hf_llama(model)  # no eos id: HF must not stop early
    prompt = torch.randint(0, 67, (2, 6))
    cache, out = KVCache(), [prompt]
    with torch.no_grad():  # greedy decoding with the cache, one new token per forward
        logits = model(prompt, past_key_values=cache)[0]
        for _ in range(18):
            out.append(logits[:, -1].argmax(dim=-1, keepdim=True))
            logits = model(out[-1], past_key_values=cache)[0]
    theirs = hf.generate(prompt, max_new_tokens=18, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(torch.cat(out, dim=1), theirs)


# ----------------------------------------------------------------------------------------
# Hugging Face export


@pytest.mark.parametrize("variant", [{}, dict(bias=True, n_head=2, rope_theta=500.0)])
def test_hf_llama_export_has_identical_logits(tmp_path, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = tk.train_bpe(["some text to learn a few merges from, some text"] * 4, vocab_size=300)
    model = scramble(tiny(vocab_size=300, **variant)).eval()
    M.save_hf(model, tok, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    idx = torch.randint(0, 300, (3, 24))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().max() > 1.0  # logits large enough that a wrong export would show
    assert (ours - theirs).abs().max().item() < 1e-5
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.config.eos_token_id == loaded_tok.eos_token_id == 0


@pytest.mark.parametrize("overrides,field", [(dict(position="learned"), "position"), (dict(mlp="gelu"), "mlp")])
def test_hf_export_refuses_non_llama_variants(overrides, field):
    with pytest.raises(ValueError, match=field):
        M.to_hf_llama(tiny(**overrides))
