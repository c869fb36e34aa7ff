"""llmlab.generate: the logits processors against Hugging Face's, the KV cache (cached ==
uncached, exact greedy tokens, for a random course GPT, course-gpt and SmolLM2), batched ==
one-by-one, speculative decoding (greedy identical to plain greedy; sampling follows the
target distribution), and text streaming with stop strings."""
from __future__ import annotations

import pytest
import torch

from llmlab import assets
from llmlab import generate as G
from llmlab.model import GPT, GPTConfig

TINY = dict(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_embd=32)


pytestmark = pytest.mark.usefixtures("seeded_one_thread")


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A random GPT with visible weights, so greedy decoding does not repeat one token forever."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.3 * torch.randn_like(p))
    return model.eval()


def load_hf(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve(name)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def course_gpt():
    if assets.state("course-gpt") != "cached":
        assets.build("course-gpt", quick=True)
    return load_hf("course-gpt")


@pytest.fixture(scope="module")
def smollm2():
    return load_hf("smollm2-135m-instruct")


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Hugging Face's own greedy decoding: the independent reference."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ----------------------------------------------------------------------------------------
# Logits processors


def test_top_k_and_top_p_match_hugging_face():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50) * 3
    for k in (1, 3, 17, 50, 80):
        want = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(G.top_k_filter(logits, k), want), k
    for p in (0.05, 0.3, 0.75, 0.95, 1.0):
        want = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(G.top_p_filter(logits, p).isinf(), want.isinf()), p


def test_top_p_keeps_the_fewest_tokens_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda p: int(G.top_p_filter(logits, p).isfinite().sum())  # noqa: E731
    assert [kept(p) for p in (0.2, 0.5, 0.51, 0.8, 0.81, 0.96, 1.0)] == [1, 1, 2, 2, 3, 4, 4]
    assert kept(5e-324) == 1  # 0 in float32: found by fuzzing the server


def test_repetition_penalty_matches_hugging_face():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 20)
    context = torch.randint(0, 20, (3, 7))
    want = RepetitionPenaltyLogitsProcessor(1.7)(context, logits.clone())
    assert torch.allclose(G.apply_repetition_penalty(logits, context, 1.7), want)
    assert torch.equal(G.apply_repetition_penalty(logits, context, 1.0), logits)


def test_length_penalty_moves_only_the_eos_logit_with_length():
    logits = torch.zeros(1, 10)
    params = G.SamplingParams(temperature=0.0, length_penalty=0.5)
    out = G.process_logits(logits, params, n_generated=4, eos_token_ids=(3,))
    assert out[0, 3] == 2.0 and out[0].sum() == 2.0
    assert torch.equal(G.process_logits(logits, params, n_generated=0, eos_token_ids=(3,)), logits)


def test_greedy_probs_are_one_hot_and_sampled_probs_respect_the_filters():
    logits = torch.randn(4, 30)
    probs = G.next_token_probs(logits, G.GREEDY)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(probs.sum(-1), torch.ones(4))
    probs = G.next_token_probs(logits, G.SamplingParams(temperature=0.7, top_k=5, top_p=0.9))
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    assert ((probs > 0).sum(-1) <= 5).all()
    assert torch.allclose(G.next_token_probs(logits, G.SamplingParams(temperature=0.5)), (logits * 2).softmax(-1))


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(2, 30)
    for temperature in (1e-4, 1e-30, 5e-324):  # 5e-324 is 0 in float32: found by fuzzing the server
        probs = G.next_token_probs(logits, G.SamplingParams(temperature=temperature))
        assert torch.isfinite(probs).all() and torch.equal(probs.argmax(-1), logits.argmax(-1))


def test_extreme_penalties_keep_the_distribution_finite():
    logits = torch.randn(2, 30)
    context = torch.tensor([[1, 2], [3, 4]])
    for penalty in (5e-324, 1e300):  # found by fuzzing the server: logit / 5e-324 = inf
        params = G.SamplingParams(temperature=0.8, repetition_penalty=penalty)
        probs = G.next_token_probs(logits, params, context)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(length_penalty=float("nan")), "length_penalty"),
])
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        G.SamplingParams(**kwargs)


def test_sampling_is_seeded():
    model = tiny_gpt()
    params = G.SamplingParams(temperature=1.2, top_p=0.95)

    def run(seed: int) -> list[int]:
        return G.generate(model, [1, 2, 3], 15, params, generator=torch.Generator().manual_seed(seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


# ----------------------------------------------------------------------------------------
# KV cache: the course GPT


def argmax_loop(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the plain way: the whole sequence through the model at every step."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_decoder_logits_with_a_cache_equal_the_full_forward():
    model = tiny_gpt()
    ids = torch.randint(0, 61, (2, 20))
    decoder, cache = G.Decoder(model), G.KVCache()
    chunks = [decoder.forward(ids[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    with torch.no_grad():
        full = model(ids)[0]
    assert len(cache) == cache.get_seq_length() == 20 and cache.keys[0].shape == (2, 4, 20, 8)
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("variant", [{}, dict(position="learned", mlp="gelu")])
def test_gpt_greedy_cached_equals_uncached_equals_the_plain_loop(variant):
    model = tiny_gpt(**variant)
    prompt = [5, 9, 2, 33, 7]
    cached = G.generate(model, prompt, 30)
    assert cached == G.generate(model, prompt, 30, use_cache=False)
    assert cached == argmax_loop(model, prompt, 30)
    assert len(set(cached)) > 3, "the test model should not repeat one token"


def test_generation_continues_from_a_prefix_cache_and_leaves_it_as_it_was():
    model = tiny_gpt()
    prompt = [5, 9, 2, 33, 7, 1, 40]
    prefix = G.KVCache()
    G.Decoder(model).forward(torch.tensor([prompt[:4]]), prefix)
    keys = [k.clone() for k in prefix.keys]
    assert G.generate(model, prompt, 20, past_key_values=prefix) == G.generate(model, prompt, 20)
    assert len(prefix) == 4 and all(torch.equal(a, b) for a, b in zip(prefix.keys, keys))
    with pytest.raises(ValueError, match="fewer than the prompt"):
        G.generate(model, prompt[:4], 5, past_key_values=prefix)


def test_generation_stops_at_eos_and_respects_the_context():
    model = tiny_gpt()
    out = G.generate(model, [1, 2], 40)
    eos = out[5]
    short = G.generate(model, [1, 2], 40, eos_token_id=eos)
    assert short == out[:out.index(eos) + 1]
    with pytest.raises(ValueError, match="context of 48"):
        G.generate(model, list(range(40)), 10)


def test_left_pad_and_decoder_mask():
    input_ids, mask = G.left_pad([[7, 8, 9], [5]], pad_token_id=0)
    assert input_ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    allowed = G.decoder_mask(mask, 3)
    assert allowed.shape == (2, 1, 3, 3)
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # padding is never a key for a real query; a padding query sees only itself
    assert allowed[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert G.position_ids(mask, 3).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_kv_cache_cat_select_crop():
    a, b = G.KVCache(), G.KVCache()
    a.extend_mask(torch.ones(1, 5, dtype=torch.long))
    a.update(0, torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))
    b.extend_mask(torch.ones(2, 2, dtype=torch.long))
    b.update(0, 2 * torch.ones(2, 2, 2, 4), 2 * torch.ones(2, 2, 2, 4))
    c = G.KVCache.cat([a, b])
    assert len(c) == 5 and c.batch_size == 3
    assert c.mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert c.keys[0][1, :, :3].abs().sum() == 0 and len(a) == 5 and a.batch_size == 1  # inputs untouched
    c.select([2, 1])  # the long row leaves: its leading positions are padding everywhere now
    assert len(c) == 2 and c.mask.tolist() == [[1, 1], [1, 1]] and (c.keys[0] == 2).all()
    c.crop(1)
    assert len(c) == 1 and c.keys[0].shape == (2, 2, 1, 4)


def test_gpt_batched_equals_one_by_one():
    model = tiny_gpt()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5], [3, 5, 8, 9], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]]
    free = [G.generate(model, p, 20) for p in prompts]
    eos = next(t for t in range(61) if 0 < sum(t in f for f in free) < len(free))  # some rows end early
    alone = [G.generate(model, p, 20, eos_token_id=eos) for p in prompts]
    assert G.generate_batch(model, prompts, 20, eos_token_id=eos) == alone
    assert sorted(map(len, alone))[0] < 20 == max(map(len, alone))


# ----------------------------------------------------------------------------------------
# KV cache: Hugging Face models (past_key_values)


def test_course_gpt_batched_equals_one_by_one(course_gpt):
    model, tok = course_gpt
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("KING.", "O Romeo, Romeo! wherefore", "I")]
    assert len({len(p) for p in prompts}) == 3
    alone = [G.generate(model, p, 25) for p in prompts]
    assert G.generate_batch(model, prompts, 25, pad_token_id=tok.pad_token_id) == alone


@pytest.mark.parametrize("fixture, text, n, expect", [("course_gpt", "ROMEO. What light", 30, ""),
                                                      ("smollm2", "The capital of France is", 8, "Paris")])
def test_cached_equals_uncached_equals_hugging_face(request, fixture, text, n, expect):
    model, tok = request.getfixturevalue(fixture)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    cached = G.generate(model, prompt, n)
    assert cached == G.generate(model, prompt, n, use_cache=False)
    assert cached == hf_greedy(model, prompt, n)
    assert expect in tok.decode(cached)


def test_smollm2_batched_equals_one_by_one(smollm2):
    model, tok = smollm2
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("1, 2, 3,", "The capital of Italy is")]
    alone = [G.generate(model, p, 6) for p in prompts]
    assert G.generate_batch(model, prompts, 6, pad_token_id=tok.pad_token_id) == alone


# ----------------------------------------------------------------------------------------
# Speculative decoding


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_plain_greedy(k):
    target, draft = tiny_gpt(0), tiny_gpt(1)  # an unrelated draft: many rejections
    prompt = [4, 8, 15, 16, 23]
    plain = G.generate(target, prompt, 25)
    out, stats = G.speculative_generate(target, draft, prompt, 25, k)
    assert out == plain
    assert stats.drafted > 0 and stats.acceptance_rate < 1
    good, good_stats = G.speculative_generate(target, target, prompt, 25, k)  # a perfect draft
    assert good == plain and good_stats.acceptance_rate == 1.0
    assert good_stats.target_calls == -(-25 // (k + 1))  # each pass yields k + 1 tokens


def test_speculative_greedy_with_an_early_exit_draft_of_course_gpt(course_gpt):
    model, tok = course_gpt
    prompt = tok("JULIET. O", add_special_tokens=False)["input_ids"]
    draft = G.early_exit_draft(model, 1)
    assert draft.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out, stats = G.speculative_generate(model, draft, prompt, 30, 4)
    assert out == G.generate(model, prompt, 30)
    assert 0 < stats.acceptance_rate < 1


def test_speculative_accept_rule():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    n, probs = G.speculative_accept(p, q, torch.tensor([2, 1]), torch.tensor([0.0, 0.0]))
    assert n == 0 and torch.allclose(probs, torch.tensor([0.5, 0.5, 0.0]))  # p(2) = 0: always rejected
    n, probs = G.speculative_accept(p, q, torch.tensor([0, 1]), torch.tensor([0.99, 0.99]))
    assert n == 2 and torch.equal(probs, p[2])  # p >= q at both: always accepted, then p's next row


def test_speculative_accept_samples_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.05, 0.45, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.4, 0.1, 0.4, 0.1]])
    counts = torch.zeros(4)
    n = 12000
    for _ in range(n):
        x = torch.multinomial(q[0], 1, generator=gen)
        accepted, probs = G.speculative_accept(p, q, x, torch.rand(1, generator=gen))
        counts[int(x) if accepted else int(torch.multinomial(probs, 1, generator=gen))] += 1
    assert (counts / n - p[0]).abs().max() < 0.02, counts / n  # the draft's q would be off by 0.35
    assert (q[0] - p[0]).abs().max() > 0.3


def test_speculative_sampling_follows_the_target_end_to_end():
    target, draft = tiny_gpt(0, vocab_size=5), tiny_gpt(3, vocab_size=5)
    prompt = [1, 2]
    with torch.no_grad():  # the exact target distribution of the 2nd new token, by enumeration
        p1 = target(torch.tensor([prompt]))[0][0, -1].softmax(-1)
        p2 = torch.stack([target(torch.tensor([prompt + [t]]))[0][0, -1].softmax(-1) for t in range(5)])
        q1 = draft(torch.tensor([prompt]))[0][0, -1].softmax(-1)
        q2 = torch.stack([draft(torch.tensor([prompt + [t]]))[0][0, -1].softmax(-1) for t in range(5)])
    want, draft_only = p1 @ p2, q1 @ q2
    assert 0.5 * (want - draft_only).abs().sum() > 0.25, "the draft must disagree for the test to mean anything"
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    runs = 600
    for _ in range(runs):
        out, _ = G.speculative_generate(target, draft, prompt, 2, 2, G.SamplingParams(), generator=gen)
        counts[out[1]] += 1
    assert 0.5 * (counts / runs - want).abs().sum() < 0.08, (counts / runs, want)  # the draft's is 0.7 off


def test_early_exit_draft_shares_weights_and_keeps_n_layers():
    model = tiny_gpt(n_layer=4)
    draft = G.early_exit_draft(model, 2)
    assert len(draft.layers) == 2 and draft.layers[1].mlp.up_proj.weight is not None
    assert draft.layers[0].self_attn.q_proj.weight.data_ptr() == model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert draft.lm_head.weight.data_ptr() == draft.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="n_layers"):
        G.early_exit_draft(model, 5)


# ----------------------------------------------------------------------------------------
# Text


def test_text_stream_holds_back_partial_characters_and_stop_strings(course_gpt):
    _, tok = course_gpt
    text = "Good night, good night! Parting is such sweet sorrow: é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = G.TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    stream = G.TextStream(tok, stop=["sweet sorrow", "XYZ"])
    released = ""
    for i in ids:
        released += stream.push(i)
        assert "sweet" not in released  # never shows the start of a stop string too early
        if stream.stopped:
            break
    assert stream.stopped and released == "Good night, good night! Parting is such "
    assert stream.push(ids[-1]) == "" and stream.finish() == ""


def test_complete_ends_at_a_stop_string(course_gpt):
    model, tok = course_gpt
    full = G.complete(model, tok, "ROMEO.", 30)
    cut = full[3:6]
    assert G.complete(model, tok, "ROMEO.", 30, stop=[cut]) == full[:full.index(cut)]


def test_batched_completion_continues_a_shared_prefix_and_stops_each_row_alone(course_gpt):
    model, tok = course_gpt
    system = "ROMEO.\n"
    prefix, prefix_ids = G.KVCache(), tok(system, add_special_tokens=False)["input_ids"]
    G.Decoder(model).forward(torch.tensor([prefix_ids]), prefix)
    keys = [k.clone() for k in prefix.keys]
    prompts = [system + t for t in ("What light", "O", "But soft, what light")]
    assert all(tok(p, add_special_tokens=False)["input_ids"][:len(prefix_ids)] == prefix_ids for p in prompts)
    free = [G.complete(model, tok, p, 20) for p in prompts]
    stop = next(c for c in "etaoinshr" if 0 < sum(c in f for f in free) < len(free))  # some rows stop early
    alone = [G.complete(model, tok, p, 20, stop=[stop], past_key_values=prefix) for p in prompts]
    assert G.complete_batch(model, tok, prompts, 20, stop=[stop], past_key_values=prefix) == alone
    assert alone == [G.complete(model, tok, p, 20, stop=[stop]) for p in prompts]
    assert len({len(a) for a in alone}) > 1 and any(stop not in f for f in free)
    assert len(prefix) == len(keys[0][0, 0]) and all(torch.equal(a, b) for a, b in zip(prefix.keys, keys))
    with pytest.raises(ValueError, match="fewer tokens than every prompt"):
        G.complete_batch(model, tok, [system, prompts[0]], 5, past_key_values=prefix)
    rows, finished = [], set()  # a row the caller finishes leaves the batch at once
    for row, _ in G.stream_batch(model, [prefix_ids, prefix_ids + [7]], 10, finished=finished):
        rows.append(row)
        finished.add(0)
    assert (rows.count(0), rows.count(1)) == (1, 10)


def test_a_hugging_face_model_extends_the_kv_cache_in_place():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 12))
    decoder, cache = G.Decoder(model), G.KVCache()
    chunks = [decoder.forward(ids[:, :8], cache), decoder.forward(ids[:, 8:9], cache)]
    storage = cache.keys[0].untyped_storage().data_ptr()
    chunks += [decoder.forward(ids[:, i:i + 1], cache) for i in range(9, 12)]
    assert cache.keys[0].untyped_storage().data_ptr() == storage, "a decoding step copied the past"
    assert len(cache) == cache.get_seq_length() == 12 and cache.keys[1].shape == (2, 2, 12, 8)
    with torch.no_grad():
        full = model(ids).logits
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
