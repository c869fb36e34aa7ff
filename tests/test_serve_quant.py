"""Weight-only int8/int4 layers for serving: lab 4's codes on torch's packed kernels give lab 4's
numbers (up to bfloat16 activations), a quantized model still serves, and `llmlab serve --quantize`."""
from __future__ import annotations

import copy

import httpx
import pytest
import torch
import torch.nn as nn

from llmlab import assets, quant, serve
from llmlab.serve_quant import INT4_GROUP, MANY_ROWS, Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_weights


@pytest.mark.parametrize("rows", [7, MANY_ROWS])  # a decode step's few rows, and a prefill's many
@pytest.mark.parametrize("cls,bits,group_size,symmetric", [(Int8WeightOnlyLinear, 8, None, True),
                                                           (Int4WeightOnlyLinear, 4, INT4_GROUP, False)])
def test_packed_layers_compute_lab_4s_dequantized_weights(cls, bits, group_size, symmetric, rows):
    torch.manual_seed(0)
    linear = nn.Linear(192, 96)
    linear.weight.data[3, 5] = 1.5  # an outlier row
    layer = cls(linear)
    reference = quant.QuantLinear(linear, bits, group_size, symmetric)  # lab 4: dequantize, then a float matmul
    x = torch.randn(2, rows, 192)
    with torch.no_grad():
        want, got = reference(x), layer(x)
        exact = nn.functional.linear(x, linear.weight, linear.bias)
    assert got.shape == want.shape == (2, rows, 96) and got.dtype == torch.float32
    # bfloat16 activations: 8 bits of mantissa, so ~0.4% of the output's scale
    assert (got - want).abs().max() <= 1e-2 * want.abs().max(), (got - want).abs().max()
    assert (got - exact).abs().max() < (0.05 if bits == 8 else 0.3) * exact.abs().max()
    assert layer.qweight.numel() * layer.qweight.element_size() <= 192 * 96 * bits // 8


def test_a_quantized_model_serves_close_to_the_float_one():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if assets.state("course-gpt") != "cached":
        assets.build("course-gpt", quick=True)
    path = assets.resolve("course-gpt")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("ROMEO. But soft, what light through yonder window breaks? It is the east")["input_ids"]])

    def nll(m: nn.Module) -> float:
        with torch.no_grad():
            logp = m(ids).logits.log_softmax(-1)[0, :-1]
        return float(-logp.gather(-1, ids[0, 1:, None]).mean())

    base = nll(model)
    for kind, bits in (("int8", 8), ("int4", 4)):
        q = quantize_weights(copy.deepcopy(model), kind)
        assert not any(type(m) is nn.Linear for m in q.modules()), kind
        # lab 4's layers (dequantize + matmul) in the same formats: the head int8 in both
        lab4 = quant.quantize_model(copy.deepcopy(model), bits, None if bits == 8 else INT4_GROUP, bits == 8)
        lab4.lm_head = quant.QuantLinear(model.lm_head, 8)
        assert abs(nll(q) - nll(lab4)) < 0.01 * nll(lab4), kind  # the same codes; bfloat16 activations
        if kind == "int8":
            assert abs(nll(q) - base) < 0.02 * base
        config = serve.ServerConfig(model_name="course-gpt", max_tokens=8)
        with serve.BackgroundServer(serve.create_app(q, tok, config)) as server:
            reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "model": "course-gpt", "prompt": "ROMEO.", "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1, reply.text


def test_the_cli_takes_quantize():
    from llmlab import cli

    assert cli.build_parser().parse_args(["serve", "--quantize", "int4"]).quantize == "int4"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--quantize", "fp8"])


def test_smoothing_keeps_the_float_model_and_helps_w8a8():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.serve_quant import smooth_activations

    if assets.state("course-gpt") != "cached":
        assets.build("course-gpt", quick=True)
    path = assets.resolve("course-gpt")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    calibration = torch.tensor(tok("KING. Now is the winter of our discontent made glorious summer. " * 8)["input_ids"])
    ids = torch.tensor([tok("ROMEO. But soft, what light through yonder window breaks? It is the east")["input_ids"]])
    embedding = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        want = model(ids).logits
        smoothed = smooth_activations(copy.deepcopy(model), calibration)
        got = smoothed(ids).logits  # x @ W.T == (x / s) @ (W * s).T: the same model
        assert (got - want).abs().max() < 1e-3 * want.abs().max()
        assert torch.equal(smoothed.model.embed_tokens.weight, embedding)  # the tied table is not rescaled
        q = quantize_weights(copy.deepcopy(model), "w8a8", calibration)
        assert all(m.qweight.abs().max() <= 63 for m in q.modules() if isinstance(m, Int8WeightOnlyLinear))
        logp = q(ids).logits.log_softmax(-1)[0, :-1]
        nll = float(-logp.gather(-1, ids[0, 1:, None]).mean())
        base = float(-want.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).mean())
        assert abs(nll - base) < 0.1 * base
    with pytest.raises(ValueError, match="Llama"):
        smooth_activations(nn.Sequential(nn.Linear(4, 4)), calibration)
