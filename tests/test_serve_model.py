"""The server's lean Llama forward (`llmlab.serve_model`) against Hugging Face's own forward, the
KV cache's in-place appends, and fused int8 layers against their parts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from llmlab import assets
from llmlab.generate import Decoder, KVCache, left_pad
from llmlab.serve_model import LlamaDecoder, fuse_linears, serving_decoder
from llmlab.serve_quant import Int8WeightOnlyLinear, quantize_weights


@pytest.fixture(scope="module")
def course():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if assets.state("course-gpt") != "cached":
        assets.build("course-gpt", quick=True)
    path = assets.resolve("course-gpt")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_a_llama_gets_the_lean_decoder_and_its_logits_equal_hugging_faces(course):
    model, tok = course
    model = copy.deepcopy(model)
    fast = serving_decoder(model)
    assert isinstance(fast, LlamaDecoder)
    prompts = [tok("ROMEO. But soft, what light")["input_ids"], tok("KING.")["input_ids"]]
    input_ids, mask = left_pad(prompts)
    with torch.no_grad():
        want = model(input_ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits  # HF's own forward, padded
        cache = KVCache()
        got = fast.forward(input_ids, cache, mask)
        real = mask.bool()
        assert (got - want)[real].abs().max() < 1e-4 * want.abs().max()
        # the next step from the cache equals HF on the whole sequence (last position)
        nxt = got[:, -1].argmax(-1, keepdim=True)
        full_ids, full_mask = torch.cat([input_ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        want = model(full_ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
        step = fast.next_logits(nxt, cache)
        assert step.shape == (2, model.config.vocab_size)
        assert (step - want[:, -1]).abs().max() < 1e-4 * want.abs().max()
        # a prompt prefilled in two chunks equals one pass
        ids = torch.tensor([prompts[0]])
        chunked = KVCache()
        fast.forward(ids[:, :3], chunked)
        assert (fast.forward(ids[:, 3:], chunked) - model(ids).logits[:, 3:]).abs().max() < 1e-4 * want.abs().max()


def test_fused_float_weights_are_views_so_the_model_still_runs_its_own_forward(course):
    model, tok = course
    model = copy.deepcopy(model)
    ids = torch.tensor([tok("ROMEO.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
        LlamaDecoder(model)
        attn = model.model.layers[0].self_attn
        assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
        assert torch.equal(model(ids).logits, before)


def test_the_cache_appends_in_place_and_a_copy_keeps_its_own_past():
    torch.manual_seed(0)
    cache = KVCache()
    k0 = torch.randn(1, 2, 3, 4)
    cache.update(0, k0, k0)
    steps = [torch.randn(1, 2, 1, 4) for _ in range(3)]
    cache.update(0, steps[0], steps[0])
    ptr = cache.keys[0].data_ptr()
    cache.update(0, steps[1], steps[1])
    assert cache.keys[0].data_ptr() == ptr  # written into the same buffer, not a new tensor
    fork = cache.copy()
    fork.update(0, -steps[2], -steps[2])
    cache.update(0, steps[2], steps[2])
    assert torch.equal(cache.keys[0], torch.cat([k0, *steps], dim=-2))
    assert torch.equal(fork.keys[0], torch.cat([k0, steps[0], steps[1], -steps[2]], dim=-2))
    cache.crop(4)  # speculative decoding rejects drafts: the next append must not see them
    cache.update(0, steps[2], steps[2])
    assert torch.equal(cache.keys[0], torch.cat([k0, steps[0], steps[2]], dim=-2))
    assert torch.equal(fork.keys[0], torch.cat([k0, steps[0], steps[1], -steps[2]], dim=-2))


@pytest.mark.parametrize("int8_activations", [False, True])
def test_fused_int8_layers_compute_their_parts_side_by_side(int8_activations):
    torch.manual_seed(0)
    parts = [Int8WeightOnlyLinear(nn.Linear(64, n, bias=False), int8_activations) for n in (64, 16, 16)]
    fused = fuse_linears(parts)
    assert isinstance(fused, Int8WeightOnlyLinear) and fused.out_features == 96
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(fused(x), torch.cat([m(x) for m in parts], -1), atol=1e-6)


def test_quantized_models_decode_close_to_the_float_one(course):
    model, tok = course
    ids = torch.tensor([tok("ROMEO. But soft, what light through yonder window breaks?")["input_ids"]])
    with torch.no_grad():
        base = Decoder(model).forward(ids, None).log_softmax(-1)
        for kind, tolerance in (("int8", 0.02), ("w8a8", 0.1), ("int4", 0.3)):
            q = quantize_weights(copy.deepcopy(model), kind)
            logp = serving_decoder(q).forward(ids, None).log_softmax(-1)
            nll = -logp[0, :-1].gather(-1, ids[0, 1:, None]).mean()
            want = -base[0, :-1].gather(-1, ids[0, 1:, None]).mean()
            assert abs(nll - want) < tolerance * want, (kind, float(nll), float(want))


def test_a_decode_step_and_a_prefill_chunk_in_one_pass_give_each_its_own_logits(course):
    model, tok = course
    fast = serving_decoder(copy.deepcopy(model))
    prompts = [tok("ROMEO. But soft, what light")["input_ids"], tok("KING.")["input_ids"]]
    chunk = torch.tensor([tok("JULIET. Ay me!")["input_ids"]])
    with torch.no_grad():
        batch_ids, mask = left_pad(prompts)
        alone, together = KVCache(), KVCache()
        last = fast.next_logits(batch_ids, alone, mask).argmax(-1, keepdim=True)  # (2, 1)
        fast.next_logits(batch_ids, together, mask)
        want_step = fast.next_logits(last, alone)
        want_chunk = fast.next_logits(chunk, KVCache())
        new = KVCache()
        got_step, got_chunk = fast.next_logits_together([(last, together, None), (chunk, new, None)])
    assert got_step.shape == (2, want_step.size(-1)) and got_chunk.shape == (1, want_chunk.size(-1))
    assert (got_step - want_step).abs().max() < 1e-4 * want_step.abs().max()
    assert (got_chunk - want_chunk).abs().max() < 1e-4 * want_chunk.abs().max()
    assert len(together) == len(alone) and len(new) == chunk.size(1)  # each part's keys joined its own cache
    assert torch.allclose(together.keys[0], alone.keys[0], atol=1e-5)
