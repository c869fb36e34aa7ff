"""Lab 6's tool-use adapter: the training set, and the shared-prefix trainer against the full forward.

The asset itself (built through the registry, cached, verified, rebuilt when its recipe
changes) is tested in test_assets.py.
"""
from __future__ import annotations

import pytest

from llmlab import data
from llmlab.agent import adapter
from llmlab.agent.parse import system_prompt
from llmlab.agent.tools import default_tools


def _tiny_llama(layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _batch(prefix_len: int = 9, lengths=(14, 22, 17), max_len: int = 24):
    """Examples sharing their first `prefix_len` tokens, the loss on each one's last 3 tokens, right-padded."""
    import torch

    from llmlab.model import IGNORE_INDEX

    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 64, (prefix_len,), generator=g)
    prefix[3] = 2  # the pad id inside the prompt is a real token there: it must stay visible
    xs, ys = [], []
    for n in lengths:
        ids = torch.cat([prefix, torch.randint(3, 64, (n + 1 - prefix_len,), generator=g)])
        y = torch.full((max_len,), IGNORE_INDEX)
        y[n - 3:n] = ids[n - 2:n + 1]
        xs.append(torch.cat([ids[:n], torch.full((max_len - n,), 2)]))  # pad id 2, as SmolLM2's <|im_end|>
        ys.append(y)
    return prefix, torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("blocks, adapted", [(2, None), (4, (2, 3))], ids=["every block adapted", "bottom 2 frozen"])
def test_the_shared_prefix_gives_the_full_forwards_loss_and_gradients(blocks, adapted):
    import torch
    import torch.nn.functional as F

    from llmlab import lora

    prefix, x, y = _batch()
    model = _tiny_llama(blocks)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                                       layers_to_transform=adapted))
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # B = 0 at init would give zero A gradients
    real = torch.tensor([14, 22, 17])
    mask = (torch.arange(x.size(1)) < real[:, None]).long()
    full = F.cross_entropy(model(input_ids=x, attention_mask=mask).logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    trainer = adapter.shared_prefix_lm(model, prefix)
    assert set(trainer.state_dict()) == {f"model.{k}" for k in model.state_dict()}  # the halves are views, not copies
    trainer(x[:1], y[:1])[1].backward()  # the first example alone: its frozen blocks' output is kept
    model.zero_grad()
    for _ in range(2):  # then a batch with one example seen and two new, then one with all three seen
        _, loss = trainer(x, y)
        loss.backward()
        assert torch.allclose(loss, full, atol=1e-6)
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, want[name], atol=1e-6, rtol=1e-4), name
        model.zero_grad()
    assert any(g.abs().max() > 1e-4 for g in want.values())  # the comparison is not between zeros

    other = prefix.clone()
    other[0] += 1
    with pytest.raises(ValueError, match="shared prefix"):
        adapter.shared_prefix_lm(model, other)(x, y)


def test_the_training_set_weighs_each_kind_the_same_and_adds_tool_free_instructions():
    recipe = adapter.AdapterRecipe(n_episodes=30, n_chat=12)
    conversations = adapter.training_conversations(recipe)
    prompt = system_prompt(default_tools())
    assert all(c[0] == {"role": "system", "content": prompt} and c[-1]["role"] == "assistant" for c in conversations)
    calls = [c for c in conversations if "Action:" in c[-1]["content"]]
    finals = [c for c in conversations if "Final Answer:" in c[-1]["content"]]
    assert len(calls) + len(finals) == len(conversations)
    direct = [c for c in finals if len(c) == 3]  # system, question, answer: no tool was called
    calculator = [c for c in calls if "Action: calculator" in c[-1]["content"]]
    lookup = [c for c in calls if "Action: lookup" in c[-1]["content"]]
    assert len(direct) == 2 * len(calculator) == 2 * len(lookup)  # a tool episode has two turns: call, answer
    questions = {c[1]["content"] for c in direct}
    instructions = {p["instruction"] for p in data.instruction_pairs(200, "train")}
    chat = questions & instructions
    assert len(chat) == 12 and not any(q.startswith("What is") for q in chat)  # arithmetic is the calculator's
    assert questions - chat  # and the episodes' own tool-free questions stay


def test_the_recipe_is_validated_and_read_from_json():
    from llmlab.lora import LoraConfig

    recipe = adapter.AdapterRecipe(lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    assert recipe.lora == LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",))
    for field in ("max_steps", "batch_size", "n_chat"):
        with pytest.raises(ValueError, match=f"AdapterRecipe.{field}"):
            adapter.AdapterRecipe(**{field: -1})
    inputs = adapter.recipe_inputs()
    assert inputs["recipe"]["max_steps"] == adapter.AdapterRecipe().max_steps  # defaults filled in
    assert adapter.recipe_inputs(n_chat=3)["conversations"] != inputs["conversations"]


def test_length_buckets_draw_each_batch_among_examples_of_similar_length():
    import torch

    from llmlab.model import IGNORE_INDEX

    examples = []
    for n in range(1, 41):  # the last target of example n-1 is at position n
        y = torch.full((48,), IGNORE_INDEX)
        y[n] = 1
        examples.append((torch.zeros(48, dtype=torch.long), y))
    buckets = adapter.LengthBuckets(examples, n=4)
    assert [len(b) for b in buckets.buckets] == [10] * 4
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        x, y = buckets.get_batch("train", 5, g)
        ends = {int((row != IGNORE_INDEX).nonzero()) for row in y}
        assert x.shape == (5, 48) and max(ends) - min(ends) < 10  # one bucket: lengths within 10 of each other
        seen |= ends
    assert seen == set(range(1, 41))  # every example is drawn
