"""llmlab.align: log-probs, Bradley-Terry, DPO against TRL's DPOTrainer, GRPO's advantages and loss."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmlab import align, assets, problems


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.resolve("smollm2-135m-instruct"))


def tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer Llama with SmolLM2's vocabulary: real code paths, seconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------------------
# Log-probabilities


def test_token_logprobs_pick_the_next_token_under_the_previous_position():
    gen = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64), torch.randint(0, 7, (2, 5), generator=gen)
    out = align.token_logprobs(logits, ids)
    assert out.shape == (2, 5) and out.dtype == torch.float64 and torch.all(out[:, 0] == 0)
    for b in range(2):
        for t in range(1, 5):
            assert out[b, t] == pytest.approx(float(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]]), abs=1e-12)


def test_sequence_logprobs_equal_the_hf_loss_on_response_tokens(tokenizer):
    model = tiny_llama(tokenizer)
    batch = align.encode(tokenizer, ["What is 2 plus 3?", "Spell cat backwards."], ["5", "tac, that is"])
    assert batch.response_mask[:, 0].sum() == 0 and (batch.response_mask <= batch.attention_mask).all()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for i in range(2):
            labels = batch.input_ids[i:i + 1].masked_fill(batch.response_mask[i:i + 1] == 0, -100)
            hf = model(input_ids=batch.input_ids[i:i + 1], attention_mask=batch.attention_mask[i:i + 1], labels=labels).loss
            n = int(batch.response_mask[i].sum())
            mean = align.sequence_logprobs(logits, batch.input_ids, batch.response_mask, average=True)[i]
            total = align.sequence_logprobs(logits, batch.input_ids, batch.response_mask)[i]
            assert float(mean) == pytest.approx(-float(hf), rel=1e-5)
            assert float(total) == pytest.approx(-float(hf) * n, rel=1e-5)


def test_encode_masks_exactly_the_reply_and_its_end_of_turn(tokenizer):
    batch = align.encode(tokenizer, ["Hi", "A longer question here?"], ["Hello there", "Yes"], system="Answer briefly.")
    for i, reply in enumerate(["Hello there", "Yes"]):
        text = tokenizer.decode(batch.input_ids[i][batch.response_mask[i].bool()])
        assert text.startswith(reply) and "<|im_end|>" in text
    short = int(batch.attention_mask.sum(1).argmin())
    assert (batch.input_ids[short][batch.attention_mask[short] == 0] == tokenizer.pad_token_id).all()


def test_adapters_off_is_the_base_model(tokenizer):
    model = tiny_llama(tokenizer)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        base = model(ids).logits
        align.add_adapters(model, r=2, lora_alpha=4)
        for layer in align.lora.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight)
        adapted = model(ids).logits
        with align.adapters_off(model):
            off = model(ids).logits
        assert not torch.allclose(adapted, base) and torch.allclose(off, base, atol=1e-6)
        assert torch.allclose(model(ids).logits, adapted)  # back on after the block


# ----------------------------------------------------------------------------------------
# Reward model


def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_gap():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    assert float(align.bradley_terry_loss(c, r)) == pytest.approx(float(-F.logsigmoid(c - r).mean()))
    assert float(align.bradley_terry_loss(c + 5, r + 5)) == pytest.approx(float(align.bradley_terry_loss(c, r)))
    assert align.preference_accuracy(c, r) == pytest.approx(1 / 3)


def test_reward_head_learns_a_direction_that_separates_held_out_pairs():
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=gen)
    feats = lambda n: torch.randn(n, 16, generator=gen) * 3 + 10  # noqa: E731 — offset and scale on purpose
    chosen, rejected = feats(200), feats(200)
    chosen += 1.5 * direction  # the best possible held-out accuracy is about 0.92
    head = align.train_reward_head(chosen[:150], rejected[:150], steps=200)
    held_c, held_r = head(chosen[150:]).squeeze(-1), head(rejected[150:]).squeeze(-1)
    assert align.preference_accuracy(held_c, held_r) > 0.8


# ----------------------------------------------------------------------------------------
# DPO


def test_dpo_loss_by_formula():
    pc, pr, rc, rr = torch.tensor([-3.0, -8.0]), torch.tensor([-5.0, -2.0]), torch.tensor([-4.0, -6.0]), torch.tensor([-4.0, -4.0])
    losses, c, r = align.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert torch.allclose(c, 0.5 * (pc - rc)) and torch.allclose(r, 0.5 * (pr - rr))
    assert torch.allclose(losses, -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr))))
    m = align.dpo_metrics(c, r)
    assert m["rewards/accuracies"] == 0.5 and m["rewards/margins"] == pytest.approx(float((c - r).mean()))


def test_dpo_matches_trl_dpo_trainer_on_the_same_batch(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = tiny_llama(tokenizer)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = problems.preference_pairs(4, "train")
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     max_steps=1, save_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
        ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        ours = align.sequence_logprobs(policy(input_ids=ids, attention_mask=mask).logits, ids, completion)
        ref = align.sequence_logprobs(reference(input_ids=ids, attention_mask=mask).logits, ids, completion)
    losses, c, r = align.dpo_loss(*ours.chunk(2), *ref.chunk(2), beta=0.3)  # TRL's batch: chosen, then rejected
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert abs(float(losses.mean()) - trl_loss) < 1e-5 and abs(trl_loss - 0.6931) > 1e-3
    for key, value in align.dpo_metrics(c, r).items():
        assert value == pytest.approx(logged[key], abs=1e-5), key


def test_train_dpo_raises_the_margin_on_its_pairs(tokenizer):
    model = tiny_llama(tokenizer)
    align.add_adapters(model, r=4, lora_alpha=8)
    pairs = problems.preference_pairs(4, "train")
    before = align.evaluate_dpo(model, tokenizer, pairs)
    assert before["margin"] == 0 and before["kl"] == pytest.approx(0, abs=1e-9)  # B = 0: policy == reference
    history = align.train_dpo(model, tokenizer, pairs, align.DPOConfig(steps=8, batch_size=4, lr=5e-3))
    after = align.evaluate_dpo(model, tokenizer, pairs)
    assert history["loss"][-1] < history["loss"][0] and after["margin"] > 0 and after["kl"] > 0


# ----------------------------------------------------------------------------------------
# GRPO


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0])
    adv = align.group_advantages(rewards, 4)
    groups = adv.view(3, 4)
    assert torch.allclose(groups.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(groups[1], torch.zeros(4)), "all-equal rewards teach nothing"
    from trl.trainer.utils import nanstd  # TRL's GRPOTrainer: Bessel-corrected group std, + 1e-4

    mean = rewards.view(-1, 4).mean(1).repeat_interleave(4)
    std = nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4)
    assert torch.allclose(adv, (rewards - mean) / (std + 1e-4))


def test_grpo_loss_gradient_is_the_policy_gradient_and_clipping_stops_it():
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    loss = align.grpo_loss(logps, logps.detach(), logps.detach(), adv, mask, beta=0.04)
    loss.backward()
    want = -(adv[:, None] * mask) / mask.sum(1, keepdim=True) / 3  # ratio = 1, KL = 0 with zero gradient
    assert torch.allclose(logps.grad, want.double())
    # a token whose ratio is already past 1 + epsilon with A > 0 gets no push further
    old = logps.detach() - 0.5  # ratio e^0.5 > 1.2
    logps.grad = None
    align.grpo_loss(logps, old, logps.detach(), torch.ones(3, dtype=torch.float64), mask, epsilon=0.2, beta=0.0).backward()
    assert torch.count_nonzero(logps.grad) == 0


def test_kl_estimate_is_nonnegative_and_zero_only_at_the_reference():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    assert (align.per_token_kl(a, b) >= 0).all() and torch.equal(align.per_token_kl(a, a), torch.zeros(4, 6))
    assert (align.sequence_kl(a, b, torch.ones(4, 6)) > 0).all()


def test_train_grpo_runs_and_reports_reward_loss_and_kl(tokenizer):
    model = tiny_llama(tokenizer)
    align.add_adapters(model, r=2, lora_alpha=4)
    items = problems.word_problems(4, "train")
    reward = lambda text, p: float(len(text) % 2)  # noqa: E731 — anything a program decides
    cfg = align.GRPOConfig(steps=2, prompts_per_step=2, group_size=3, max_new_tokens=6, lr=1e-2, prefix="The answer is")
    history = align.train_grpo(model, tokenizer, items, reward, cfg)
    assert len(history["reward"]) == 2 and all(k >= 0 for k in history["kl"])
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in align.lora.lora_layers(model).values()), \
        "rewards that differ within a group move the adapters"


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="beta"):
        align.DPOConfig(beta=0)
    with pytest.raises(ValueError, match="group_size"):
        align.GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="steps"):
        align.GRPOConfig(steps=0)


def test_sample_masks_the_completion_through_its_end_of_turn(tokenizer):
    model = tiny_llama(tokenizer)
    torch.manual_seed(0)
    batch, texts = align.sample(model, tokenizer, ["What is 2 plus 2?"], 3, max_new_tokens=5)
    assert batch.input_ids.shape[0] == 3 and len(texts) == 3
    prompt_len = batch.input_ids.shape[1] - 5
    assert batch.response_mask[:, :prompt_len].sum() == 0 and (batch.response_mask[:, prompt_len:].sum(1) >= 1).all()


def test_a_prefix_ends_the_prompt_and_stays_out_of_the_sampled_text(tokenizer):
    model = tiny_llama(tokenizer)
    plain, _ = align.chat_prompts(tokenizer, ["What is 2 plus 2?"], "Answer briefly.")
    ids, _ = align.chat_prompts(tokenizer, ["What is 2 plus 2?"], "Answer briefly.", prefix="The answer is")
    start = tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    assert ids[0, -len(start):].tolist() == start and torch.equal(ids[:, :plain.shape[1]], plain)
    torch.manual_seed(0)
    batch, texts = align.sample(model, tokenizer, ["What is 2 plus 2?"], 2, max_new_tokens=4, system="Answer briefly.",
                                prefix="The answer is")
    assert batch.response_mask[:, :ids.shape[1]].sum() == 0, "the given prefix is not a sampled token"
    assert batch.input_ids.shape[1] == ids.shape[1] + 4 and len(texts) == 2


def test_adapter_states_swap_policies_on_one_model(tokenizer):
    model = tiny_llama(tokenizer)
    align.add_adapters(model, r=2, lora_alpha=4)
    ids = torch.tensor([[1, 5, 9, 3]])
    fresh = align.adapter_state(model)
    reference = model(input_ids=ids).logits
    with torch.no_grad():
        for layer in align.lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    tuned = align.adapter_state(model)
    moved = model(input_ids=ids).logits
    assert not torch.allclose(moved, reference)
    align.load_adapter_state(model, fresh)
    assert torch.allclose(model(input_ids=ids).logits, reference), "the fresh state is the reference again"
    with align.using_adapters(model, tuned):
        assert torch.allclose(model(input_ids=ids).logits, moved)
    assert torch.allclose(model(input_ids=ids).logits, reference), "the block restores the state it found"
    with pytest.raises(ValueError):
        align.load_adapter_state(model, {"nope": torch.zeros(1)})
