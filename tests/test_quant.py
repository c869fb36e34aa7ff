"""llmlab.quant: round-trip bounds, torch's fake-quantize as an independent reference, int4
packing, group-wise scales against outliers, QuantLinear and quantize_model, GPTQ-style
compensation, measurements; and the lab-4 checks against correct and mistaken answers."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llmlab import checks, quant


def _rows(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(*shape[:-1], 1, generator=gen) * 4 - 3)  # rows from 1e-3 to 10
    return (torch.randn(*shape, generator=gen) * magnitude).to(dtype)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_absmax_round_trip_within_half_a_step(bits, dtype):
    x = _rows(bits, (16, 64), dtype)
    q, scale = quant.absmax_quantize(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.shape == (16, 1)
    assert int(q.abs().max()) == qmax  # the largest |x| of each row lands on the largest code
    assert bool((q.abs().amax(-1) == qmax).all())
    err = (quant.absmax_dequantize(q, scale) - x.to(scale.dtype)).abs()
    assert bool((err <= scale / 2 * (1 + 1e-6)).all()), float((err / scale).max())
    assert float((err / scale).max()) > 0.4  # the bound is tight, not loose by a factor


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zeropoint_round_trip_within_half_a_step_and_zero_is_exact(bits):
    x = _rows(10 + bits, (16, 64))
    x[0] = x[0].abs() + 1.0  # all positive
    x[1] = -x[1].abs() - 1.0  # all negative
    x[2, ::3] = 0.0
    q, scale, zero = quant.zeropoint_quantize(x, bits)
    assert q.dtype == torch.uint8 and zero.dtype == torch.uint8
    assert 0 <= int(q.min()) and int(q.max()) <= 2**bits - 1
    deq = quant.zeropoint_dequantize(q, scale, zero)
    assert bool(((deq - x).abs() <= scale / 2 * (1 + 1e-6)).all())
    assert bool((deq[2, ::3] == 0).all()), "0.0 must be exactly representable"
    assert int(zero[0]) == 0 and int(zero[1]) == 2**bits - 1  # the range always reaches 0


def test_zero_rows_do_not_divide_by_zero():
    x = torch.zeros(2, 8)
    assert torch.equal(quant.absmax_dequantize(*quant.absmax_quantize(x)), x)
    assert torch.equal(quant.zeropoint_dequantize(*quant.zeropoint_quantize(x)), x)


@pytest.mark.parametrize("bits", [4, 8])
def test_matches_torch_fake_quantize_per_channel(bits):
    w = _rows(3, (32, 48))
    q, scale = quant.absmax_quantize(w, bits)
    qmax = 2 ** (bits - 1) - 1
    ref = torch.fake_quantize_per_channel_affine(w, scale.squeeze(1), torch.zeros(32, dtype=torch.int32), 0, -qmax, qmax)
    assert torch.allclose(quant.absmax_dequantize(q, scale), ref, rtol=0, atol=1e-7)
    q, scale, zero = quant.zeropoint_quantize(w, bits)
    ref = torch.fake_quantize_per_channel_affine(w, scale.squeeze(1), zero.squeeze(1).int(), 0, 0, 2**bits - 1)
    assert torch.allclose(quant.zeropoint_dequantize(q, scale, zero), ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("group_size", [None, 16, 20, 48, 100])
@pytest.mark.parametrize("symmetric", [True, False])
def test_groups_round_trip_within_half_a_step_of_their_own_scale(group_size, symmetric):
    w = _rows(4, (12, 48))
    q, scale, zero = quant.quantize_groups(w, 4, group_size, symmetric)
    n_groups = 1 if group_size is None else math.ceil(48 / group_size)
    assert q.shape == w.shape and scale.shape == (12, n_groups)
    step = quant.expand_groups(scale, group_size or 48, 48)
    err = (quant.dequantize_groups(q, scale, zero, group_size) - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-6)).all())


def test_group_scales_equal_the_row_functions_on_each_group():
    w = _rows(5, (6, 40))
    q, scale, _ = quant.quantize_groups(w, 4, 16)  # groups of 16, 16 and a short one of 8
    for g, cols in enumerate((slice(0, 16), slice(16, 32), slice(32, 40))):
        q_ref, s_ref = quant.absmax_quantize(w[:, cols], 4)
        assert torch.equal(q[:, cols], q_ref) and torch.equal(scale[:, g:g + 1], s_ref)


def test_group_wise_beats_per_tensor_on_a_planted_outlier():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(64, 256, generator=gen) * 0.02
    w[7, 100] = 4.0  # one weight 200x the typical size, as LLM weights have
    per_tensor = quant.absmax_dequantize(*quant.absmax_quantize(w.reshape(1, -1), 4)).reshape(w.shape)
    per_channel = quant.fake_quantize(w, 4, None)
    group = quant.fake_quantize(w, 4, 32)
    mse = lambda a: float(((a - w) ** 2).mean())  # noqa: E731
    assert mse(group) < mse(per_channel) < mse(per_tensor)
    assert mse(group) < mse(per_tensor) / 50
    # per tensor, the outlier's scale rounds almost every other weight to 0
    assert float((per_tensor == 0).float().mean()) > 0.95


# ----------------------------------------------------------------------------------------
# int4 packing


def test_pack_int4_layout_and_round_trip():
    assert quant.pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]
    q = torch.randint(0, 16, (5, 3, 8), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 4)
    assert torch.equal(quant.unpack_int4(packed), q)


def test_pack_int4_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="even"):
        quant.pack_int4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        quant.pack_int4(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer"):
        quant.pack_int4(torch.zeros(4))


def test_packed_int4_is_exactly_half_of_int8():
    linear = nn.Linear(96, 40)
    int8, int4 = quant.QuantLinear(linear, bits=8, group_size=32), quant.QuantLinear(linear, bits=4, group_size=32)
    assert int8.qweight.nbytes == 96 * 40
    assert int4.qweight.nbytes * 2 == int8.qweight.nbytes
    assert quant.model_bytes(int8) - quant.model_bytes(int4) == 96 * 40 // 2  # scales and bias are the same


# ----------------------------------------------------------------------------------------
# QuantLinear and quantize_model


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 16), (8, 32)])
def test_quant_linear_equals_linear_with_the_dequantized_weight(bits, group_size):
    torch.manual_seed(bits)
    linear = nn.Linear(64, 24)
    layer = quant.QuantLinear(linear, bits, group_size)
    # the reference weight, from the row functions on each group: an independent path
    gs = group_size or 64
    q, scale = quant.absmax_quantize(linear.weight.detach().reshape(24, 64 // gs, gs), bits)
    w_hat = quant.absmax_dequantize(q, scale).reshape(24, 64)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, w_hat, linear.bias), atol=1e-6)
        assert torch.allclose(layer.dequantized_weight(), w_hat, atol=1e-7)


def test_quant_linear_zero_point_and_no_bias():
    linear = nn.Linear(32, 8, bias=False)
    layer = quant.QuantLinear(linear, bits=4, group_size=8, symmetric=False)
    assert layer.bias is None and layer.zero is not None and layer.zero.dtype == torch.uint8
    x = torch.randn(3, 32)
    w_hat = quant.fake_quantize(linear.weight, 4, 8, symmetric=False)
    assert torch.allclose(layer(x), x @ w_hat.T, atol=1e-6)


def test_quant_linear_rejects_bad_settings():
    with pytest.raises(ValueError, match="bits"):
        quant.QuantLinear(nn.Linear(8, 4), bits=3)
    with pytest.raises(ValueError, match="even"):
        quant.QuantLinear(nn.Linear(7, 4), bits=4)
    with pytest.raises(ValueError, match="group_size"):
        quant.QuantLinear(nn.Linear(8, 4), bits=8, group_size=0)


def test_quantize_model_replaces_linears_and_skips_what_it_should(tiny_llama):
    model = quant.quantize_model(copy.deepcopy(tiny_llama), bits=8, skip=("lm_head", "mlp.down_proj"))
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear"
    assert all(kinds[f"model.layers.{i}.mlp.down_proj"] == "Linear" for i in range(2))
    for i in range(2):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            assert kinds[f"model.layers.{i}.{proj}"] == "QuantLinear", proj
    assert kinds["model.embed_tokens"] == "Embedding"
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref, out = tiny_llama(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=0.05) and not torch.equal(out, ref)


def test_model_bytes_counts_tied_weights_once_and_shrinks_with_bits(tiny_llama):
    fp32 = quant.model_bytes(tiny_llama)
    params = {p.data_ptr(): p.numel() for p in tiny_llama.parameters()}  # tied: one storage
    assert fp32 == 4 * sum(params.values())
    int8 = quant.model_bytes(quant.quantize_model(copy.deepcopy(tiny_llama), 8))
    int4 = quant.model_bytes(quant.quantize_model(copy.deepcopy(tiny_llama), 4, 32))
    linear = sum(m.weight.numel() for m in quant.linear_layers(tiny_llama, ("lm_head",)).values())
    assert fp32 - int8 > 0.7 * 3 * linear  # 4 bytes -> ~1 byte per Linear weight
    assert int8 - int4 > 0.3 * linear


# ----------------------------------------------------------------------------------------
# GPTQ-style compensation


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    gen = torch.Generator().manual_seed(7)
    in_f, out_f = 64, 32
    mix = torch.randn(in_f, in_f, generator=gen) / in_f**0.5
    X = torch.randn(2048, in_f, generator=gen) @ mix * torch.linspace(0.2, 3, in_f)  # correlated inputs
    w = torch.randn(out_f, in_f, generator=gen) * 0.1
    q, scale, zero = quant.gptq_quantize(w, X.T @ X, bits=4, group_size=16)
    assert q.dtype == torch.int8 and scale.shape == (out_f, 4) and zero is None
    assert int(q.abs().max()) <= 7
    w_gptq = quant.dequantize_groups(q, scale, zero, 16)
    w_rtn = quant.fake_quantize(w, 4, 16)
    err = lambda w_hat: float(((X @ (w - w_hat).T) ** 2).mean())  # noqa: E731
    assert err(w_gptq) < 0.8 * err(w_rtn), (err(w_gptq), err(w_rtn))
    layer = quant.QuantLinear(nn.Linear(in_f, out_f), 4, 16, codes=(q, scale, zero))
    assert torch.allclose(layer.dequantized_weight(), w_gptq, atol=1e-6)


def test_gptq_model_quantizes_every_linear_and_stays_close(tiny_llama):
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(8))
    model = quant.gptq_model(copy.deepcopy(tiny_llama), calib, bits=8, group_size=32)
    assert sum(isinstance(m, quant.QuantLinear) for m in model.modules()) == 14  # 7 per layer
    with torch.no_grad():
        assert torch.allclose(model(input_ids=calib).logits, tiny_llama(input_ids=calib).logits, atol=0.05)


# ----------------------------------------------------------------------------------------
# Measurements


class _Uniform(nn.Module):
    """A 'language model' whose logits are all equal: perplexity = vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_of_uniform_guessing_is_the_vocabulary_size():
    assert math.isclose(quant.perplexity(_Uniform(50), torch.randint(0, 50, (37,)), block_size=8), 50.0, rel_tol=1e-6)


def test_perplexity_sums_every_window_once(tiny_llama):
    ids = torch.randint(0, 96, (45,), generator=torch.Generator().manual_seed(9))
    nll, n = 0.0, 0
    with torch.no_grad():
        for window in ids.split(16):  # 16, 16, 13: padding of the short one must not count
            logits = tiny_llama(input_ids=window[None]).logits[0]
            nll += float(F.cross_entropy(logits[:-1], window[1:], reduction="sum"))
            n += len(window) - 1
    assert math.isclose(quant.perplexity(tiny_llama, ids, block_size=16, batch_size=2), math.exp(nll / n), rel_tol=1e-5)
    with pytest.raises(ValueError, match="1-D"):
        quant.perplexity(tiny_llama, ids.view(5, 9))


def test_magnitude_prune_zeroes_the_smallest_exactly():
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(10))
    out = quant.magnitude_prune(w, 0.29)
    zeros = out == 0
    assert int(zeros.sum()) == round(0.29 * 600)
    assert float(w[zeros].abs().max()) <= float(w[~zeros].abs().min())
    assert torch.equal(out[~zeros], w[~zeros]) and not bool((w == 0).any())
    assert torch.equal(quant.magnitude_prune(w, 0.0), w) and int((quant.magnitude_prune(w, 1.0) != 0).sum()) == 0
    with pytest.raises(ValueError, match="sparsity"):
        quant.magnitude_prune(w, 1.5)


def test_prune_model_reaches_the_sparsity_and_keeps_the_size(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    size = quant.model_bytes(model)
    quant.prune_model(model, 0.5)
    assert abs(quant.sparsity(model) - 0.5) < 1e-3
    assert quant.model_bytes(model) == size  # dense zeros take as much room as any other weight
    assert not bool((model.lm_head.weight == 0).any())  # skipped (and tied to the embedding)


def test_dynamic_int8_is_close_smaller_and_leaves_the_original():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    int8 = quant.dynamic_int8(model)
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))  # the original is untouched
    x = torch.randn(8, 128)
    with torch.no_grad():
        ref, out = model(x), int8(x)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert quant.model_bytes(int8) < 0.3 * quant.model_bytes(model)
    partly = quant.dynamic_int8(model, skip=("2",))
    assert isinstance(partly[2], nn.Linear) and not isinstance(partly[0], nn.Linear)


def test_sentence_embeddings_mean_pool_ignores_padding():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(last_hidden_state=self.emb(input_ids))

    def tokenizer(sentences, **kwargs):
        ids = [[int(c) for c in s] for s in sentences]
        T = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (T - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i in ids])}

    model = Encoder()
    out = quant.sentence_embeddings(model, tokenizer, ["12", "1234"])
    want = F.normalize(model.emb.weight[[1, 2]].mean(0), dim=0)
    assert torch.allclose(out[0], want, atol=1e-6) and torch.allclose(out.norm(dim=-1), torch.ones(2))


def test_report_table_shows_relative_figures():
    table = quant.report_table([{"name": "fp32", "bytes": 4e6, "perplexity": 10.0},
                                {"name": "int8", "bytes": 1e6, "perplexity": 10.1}])
    lines = table.splitlines()
    assert "perplexity" in lines[0] and len(lines) == 4
    assert "4.00" in lines[3] and "+1.00%" in lines[3]
    with pytest.raises(ValueError):
        quant.report_table([])


# ----------------------------------------------------------------------------------------
# The lab's checks: correct answers pass, typical mistakes are named


def _absmax(x, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
    return torch.round(x / scale).to(torch.int8), scale


def _zeropoint(x, bits, include_zero=True, wrap=False):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo).clamp(min=1e-12) / (2**bits - 1)
    zero = torch.round(-lo / scale)
    q = torch.round(x / scale) + zero
    return (q.to(torch.uint8) if wrap else q.clamp(0, 2**bits - 1).to(torch.uint8)), scale, zero.to(torch.uint8)


def _group(w, bits, gs):
    q, s = _absmax(w.reshape(w.shape[0], -1, gs), bits)
    return (q.float() * s).reshape(w.shape)


def _prune(w, sparsity):
    k = round(sparsity * w.numel())
    out = w.clone()
    out.view(-1)[w.abs().flatten().argsort()[:k]] = 0
    return out


def _int4_linear(x, packed, scale, gs, bias, offset=8):
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(-2).float() - offset
    y = x @ (codes * scale.repeat_interleave(gs, 1)).T
    return y if bias is None else y + bias


def test_checks_pass_correct_answers(capsys):
    checks.check_absmax(_absmax, lambda q, s: q.float() * s)
    checks.check_zeropoint(_zeropoint, lambda q, s, z: (q.float() - z.float()) * s)
    checks.check_group_quantize(_group)
    checks.check_int4_packing(lambda q: q[..., 0::2] | (q[..., 1::2] << 4),
                              lambda p: torch.stack([p & 15, p >> 4], -1).flatten(-2))
    checks.check_int4_linear(_int4_linear)
    checks.check_prune(_prune)
    out = capsys.readouterr().out
    assert out.count("✓") == 6


MISTAKES = [
    (lambda: checks.check_absmax(lambda x, b: (torch.round(x / (x.abs().amax(-1, keepdim=True) / 2 ** (b - 1))).to(torch.int8),
                                               x.abs().amax(-1, keepdim=True) / 2 ** (b - 1)), lambda q, s: q * s),
     "largest code is 2"),
    (lambda: checks.check_absmax(lambda x, b: ((x / _absmax(x, b)[1]).to(torch.int8), _absmax(x, b)[1]), lambda q, s: q * s),
     "truncated"),
    (lambda: checks.check_absmax(lambda x, b: (_absmax(x, b)[0], _absmax(x, b)[1].squeeze(-1)), lambda q, s: q * s),
     "keepdim"),
    (lambda: checks.check_zeropoint(lambda x, b: _zeropoint(x, b, include_zero=False), lambda q, s, z: (q.float() - z.float()) * s),
     "include 0"),
    (lambda: checks.check_zeropoint(_zeropoint, lambda q, s, z: (q - z) * s), "wraps around"),
    (lambda: checks.check_group_quantize(lambda w, b, gs: _group(w, b, w.shape[1])), "needs its own"),
    (lambda: checks.check_int4_packing(lambda q: q[..., 1::2] | (q[..., 0::2] << 4),
                                       lambda p: torch.stack([p & 15, p >> 4], -1).flatten(-2)), "swapped"),
    (lambda: checks.check_int4_packing(lambda q: q[..., 0::2] | (q[..., 1::2] << 4),
                                       lambda p: torch.cat([p & 15, p >> 4], -1)), "interleave"),
    (lambda: checks.check_int4_linear(lambda *a: _int4_linear(*a, offset=0)), "subtract 8"),
    (lambda: checks.check_int4_linear(lambda x, p, s, gs, b: _int4_linear(x, p, s, gs, None)), "bias"),
    (lambda: checks.check_prune(lambda w, s: _prune(w, s) if s == 0 else w.masked_fill(w <= w.flatten().kthvalue(
        max(1, round(s * w.numel()))).values, 0)), "NEGATIVE"),
    (lambda: checks.check_prune(lambda w, s: w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(max(1, round(s * w.numel()))).values, 0)
     if s else w), "in place"),
]


@pytest.mark.parametrize("case", range(len(MISTAKES)))
def test_checks_name_the_mistake(case):
    run, words = MISTAKES[case]
    with pytest.raises(AssertionError, match=words):
        run()


def test_plots_have_labelled_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"name": "fp32", "bytes": 4e6, "perplexity": 10.0}, {"name": "int4", "bytes": 1e6, "perplexity": 11.0}]
    figures = [quant.plot_size_quality(rows),
               quant.plot_group_error([16, 32, 64], {"int4": [1e-3, 2e-3, 4e-3]}, {"per-tensor": 1e-1}),
               quant.plot_sparsity([0.0, 0.5, 0.9], [10.0, 12.0, 400.0], {"int4": 11.0})]
    for fig in figures:
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() and ax.get_legend() is not None
        plt.close(fig)
