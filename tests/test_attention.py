"""llmlab.attention against independent references: PyTorch, nn.MultiheadAttention, Hugging Face."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab import assets, runtime
from llmlab import attention as A

F64 = dict(atol=1e-10, rtol=0)
F32 = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def qkv(*lead, T_q=5, T_k=7, d=8, d_v=6, dtype=torch.float64):
    return (torch.randn(*lead, T_q, d, dtype=dtype), torch.randn(*lead, T_k, d, dtype=dtype),
            torch.randn(*lead, T_k, d_v, dtype=dtype))


# ----------------------------------------------------------------------------------------
# scaled dot-product attention


@pytest.mark.parametrize("lead", [(), (3,), (2, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_sdpa_matches_torch_without_mask(lead, dtype, tol):
    q, k, v = qkv(*lead, dtype=dtype)
    out = A.scaled_dot_product_attention(q, k, v)
    assert out.dtype == dtype and out.shape == (*lead, 5, 6)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **tol)


def test_sdpa_matches_torch_with_masks():
    q, k, v = qkv(2, 3)
    random = torch.rand(2, 1, 5, 7) < 0.5
    random[..., 0] = True
    padding = A.padding_mask(torch.tensor([7, 3]), 7)
    for mask in (random, padding, torch.rand(5, 7) < 0.7):
        torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v, mask),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **F64)
    q, k, v = qkv(2, 3, T_q=7)
    torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v, A.causal_mask(7)),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), **F64)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(2))
    mask = torch.rand(2, 5, 7) < 0.5
    mask[0, 3] = False
    out = A.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **F64)
    assert torch.equal(out[0, 3], torch.zeros(6, dtype=torch.float64))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_attention_weights_rows_sum_to_one_and_use_the_scale():
    q, k, _ = qkv(4)
    w = A.attention_weights(q, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 5, dtype=torch.float64), **F64)
    torch.testing.assert_close(w, torch.softmax(q @ k.mT / math.sqrt(8), -1), **F64)
    torch.testing.assert_close(A.attention_weights(q, k, scale=1.0), torch.softmax(q @ k.mT, -1), **F64)


def test_mask_must_be_bool():
    q, k, _ = qkv()
    with pytest.raises(TypeError, match="bool"):
        A.attention_weights(q, k, torch.ones(5, 7))


def test_bias_is_added_to_the_scores():
    q, k, v = qkv(2, 4, T_q=6, T_k=6)
    bias, causal = A.alibi_bias(4, 6).double(), A.causal_mask(6)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")))
    torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v, causal, bias=bias), want, **F64)


# ----------------------------------------------------------------------------------------
# masks and heads


def test_causal_mask():
    assert A.causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert A.causal_mask(4, device="cpu").dtype == torch.bool


def test_padding_mask():
    m = A.padding_mask(torch.tensor([2, 4, 0]), 4)
    assert m.shape == (3, 1, 1, 4) and m.dtype == torch.bool
    assert m[:, 0, 0].tolist() == [[True, True, False, False], [True] * 4, [False] * 4]


def test_split_and_merge_heads():
    x = torch.randn(2, 5, 12)
    h = A.split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    for i in range(3):
        assert torch.equal(h[:, i], x[..., 4 * i:4 * (i + 1)])
    assert torch.equal(A.merge_heads(h), x)
    assert torch.equal(A.merge_heads(A.split_heads(x[0], 4)), x[0])  # no batch axis
    with pytest.raises(ValueError, match="divisible"):
        A.split_heads(x, 5)


# ----------------------------------------------------------------------------------------
# multi-head attention vs nn.MultiheadAttention


def _weights_of(mha: nn.MultiheadAttention) -> list[torch.Tensor | None]:
    w_q, w_k, w_v = mha.in_proj_weight.detach().chunk(3)
    if mha.in_proj_bias is None:
        b_q = b_k = b_v = b_o = None
    else:
        b_q, b_k, b_v = mha.in_proj_bias.detach().chunk(3)
        b_o = mha.out_proj.bias.detach()
    return [w_q, b_q, w_k, b_k, w_v, b_v, mha.out_proj.weight.detach(), b_o]


@pytest.mark.parametrize("bias", [True, False])
def test_multi_head_attention_matches_nn(bias):
    D, H, T = 24, 6, 7
    ref = nn.MultiheadAttention(D, H, batch_first=True, bias=bias, dtype=torch.float64)
    x = torch.randn(3, T, D, dtype=torch.float64)
    lengths = torch.tensor([7, 5, 2])
    key_padding = torch.arange(T)[None, :] >= lengths[:, None]  # nn: True = ignore
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # nn: True = forbidden
    with torch.no_grad():
        plain, _ = ref(x, x, x, need_weights=False)
        masked, _ = ref(x, x, x, key_padding_mask=key_padding, attn_mask=future, need_weights=False)
    w = _weights_of(ref)
    torch.testing.assert_close(A.multi_head_attention(x, *w, H), plain, **F64)
    mask = A.causal_mask(T) & A.padding_mask(lengths, T)
    torch.testing.assert_close(A.multi_head_attention(x, *w, H, mask), masked, **F64)


def test_module_matches_nn_and_function():
    D, H = 32, 4
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    layer = A.MultiHeadAttention(D, H)
    w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o = _weights_of(ref)
    with torch.no_grad():
        for proj, w, b in ((layer.q_proj, w_q, b_q), (layer.k_proj, w_k, b_k),
                           (layer.v_proj, w_v, b_v), (layer.o_proj, w_o, b_o)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        x = torch.randn(2, 9, D)
        want, _ = ref(x, x, x, need_weights=False)
        torch.testing.assert_close(layer(x), want, **F32)
        mask = A.causal_mask(9)
        torch.testing.assert_close(layer(x, mask), A.multi_head_attention(x, w_q, b_q, w_k, b_k, w_v, b_v,
                                                                          w_o, b_o, H, mask), **F32)
    assert {n for n, _ in layer.named_parameters()} == {
        f"{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")}
    with pytest.raises(ValueError, match="n_heads"):
        A.MultiHeadAttention(30, 4)


def test_module_without_bias_and_with_dropout():
    layer = A.MultiHeadAttention(16, 2, bias=False, dropout=0.5)
    assert all(p.bias is None for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj))
    x = torch.randn(2, 4, 16)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))  # dropout is off in eval mode
    layer.train()
    out = layer(x)
    out.sum().backward()
    assert layer.q_proj.weight.grad is not None


# ----------------------------------------------------------------------------------------
# positions


def test_sinusoidal_positions_formula():
    T, d = 11, 10
    pe = A.sinusoidal_positions(T, d)
    assert pe.shape == (T, d) and pe.dtype == torch.float32
    for p in range(T):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert A.sinusoidal_positions(4, 7).shape == (4, 7)  # odd width: the last column is a sin


def _llama_cos_sin(T: int, head_dim: int, base: float, positions: torch.Tensor | None = None):
    """cos, sin from Hugging Face's LlamaRotaryEmbedding: an independent reference."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=base,
                         max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(T) if positions is None else positions
    x = torch.zeros(1, T, head_dim, dtype=torch.float32)
    cos, sin = rotary(x, positions[None])
    return cos[0], sin[0]  # (T, head_dim)


def test_rope_cache_matches_llama():
    cos, sin = A.rope_cache(20, 16, base=500.0)
    want_cos, want_sin = _llama_cos_sin(20, 16, 500.0)
    torch.testing.assert_close(cos, want_cos, **F32)
    torch.testing.assert_close(sin, want_sin, **F32)


def test_apply_rope_matches_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    positions = torch.tensor([4, 0, 1, 9, 2, 2, 30, 7, 5])
    cos, sin = _llama_cos_sin(9, 16, 10000.0, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(A.apply_rope(q, positions), q_hf, **F32)
    torch.testing.assert_close(A.apply_rope(k, positions), k_hf, **F32)
    c, s = A.rope_cache(9, 16)
    torch.testing.assert_close(A.apply_rotary(q, c, s), A.apply_rope(q, torch.arange(9)), **F32)


def test_rope_is_a_relative_rotation():
    x = torch.randn(3, 8, 32, dtype=torch.float64)
    positions = torch.arange(8) * 3
    out = A.apply_rope(x, positions)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), **F64)
    q, k = torch.randn(1, 32, dtype=torch.float64), torch.randn(1, 32, dtype=torch.float64)
    score = lambda m, n: (A.apply_rope(q, torch.tensor([m])) * A.apply_rope(k, torch.tensor([n]))).sum()
    for m in (1, 17, 500):
        assert score(m + 5, m).item() == pytest.approx(score(5, 0).item(), abs=1e-9)


def test_rope_keeps_low_precision_dtype_and_broadcasts_positions():
    x = torch.randn(2, 4, 6, 8, dtype=torch.bfloat16)
    assert A.apply_rope(x, torch.arange(6)).dtype == torch.bfloat16
    per_batch = torch.stack([torch.arange(6), torch.arange(6) + 10])[:, None, :]  # (B, 1, T)
    out = A.apply_rope(x.float(), per_batch)
    torch.testing.assert_close(out[1], A.apply_rope(x[1].float(), torch.arange(6) + 10), **F32)
    with pytest.raises(ValueError, match="even"):
        A.apply_rope(torch.randn(3, 5), torch.arange(3))


def test_alibi():
    torch.testing.assert_close(A.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # 6 heads: the 4-head slopes, then every other slope of the 8-head series
    torch.testing.assert_close(A.alibi_slopes(6), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                                2.0 ** -1, 2.0 ** -3]))
    bias = A.alibi_bias(4, 5)
    assert bias.shape == (4, 5, 5)
    assert bias[0, 4, 1].item() == pytest.approx(-3 * 2 ** -2)
    assert torch.equal(bias.diagonal(dim1=-2, dim2=-1), torch.zeros(4, 5))


# ----------------------------------------------------------------------------------------
# a real model: MiniLM's attention probabilities from its own weights


@pytest.fixture(scope="module")
def minilm():
    if not assets.is_cached("minilm-l6"):
        pytest.skip("minilm-l6 is not in the cache (llmlab assets fetch minilm-l6)")
    from transformers import AutoModel, AutoTokenizer
    from transformers import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = assets.resolve("minilm-l6")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()


def test_attention_weights_reproduce_minilm(minilm):
    tokenizer, model = minilm
    batch = tokenizer(["Short.", "A longer sentence that forces padding on the first one."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    H = model.config.num_attention_heads
    mask = A.padding_mask(batch["attention_mask"].sum(-1), batch["input_ids"].shape[1])
    for layer in range(model.config.num_hidden_layers):
        attn = model.encoder.layer[layer].attention.self
        with torch.no_grad():
            q = A.split_heads(attn.query(out.hidden_states[layer]), H)
            k = A.split_heads(attn.key(out.hidden_states[layer]), H)
        torch.testing.assert_close(A.attention_weights(q, k, mask), out.attentions[layer], **F32)


# ----------------------------------------------------------------------------------------
# the quadratic cost, measured


def test_peak_memory_counts_live_tensors():
    with runtime.peak_memory() as m:
        a = torch.ones(1000, 250)  # 1,000,000 bytes
        b = a * 2  # another 1,000,000 while a is alive
        del a, b
        c = torch.ones(100)
    assert m["bytes"] == 2_000_000
    del c


def test_attention_memory_grows_quadratically():
    peaks = []
    for T in (128, 256):
        q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
        with runtime.peak_memory() as m:
            A.scaled_dot_product_attention(q, k, v)
        peaks.append(m["bytes"])
        assert m["bytes"] >= 2 * T * T * 4  # at least the (1, 2, T, T) float32 scores
    assert 3.5 < peaks[1] / peaks[0] < 4.5
