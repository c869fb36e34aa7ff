"""LoRA: init, forward, merge, injection by dotted name, accounting, adapter files, peft parity,
instruction-tuning examples with the prompt masked out of the loss, and the classification helpers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab import lora
from llmlab.model import IGNORE_INDEX
from llmlab.train import HFCausalLM, TrainConfig, train


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every lora_B non-zero values, so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.xq_proj = nn.Linear(d, d)  # contains "q_proj" but is not a target

    def forward(self, x):
        return self.q_proj(x) * self.k_proj(x) + self.v_proj(x) + self.xq_proj(x)


class Nested(nn.Module):
    def __init__(self, d: int = 8, n: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": Attention(d)}) for _ in range(n))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["attn"](x)
        return self.out(x)


# ----------------------------------------------------------------------------------------
# The math


def test_init_is_peft_default_kaiming_A_and_zero_B():
    A, B = lora.lora_init(100, 30, 4, seed=0)
    assert A.shape == (4, 100) and B.shape == (30, 4)
    assert torch.count_nonzero(B) == 0
    assert A.abs().max() <= 1 / math.sqrt(100) and A.std() > 0.8 / math.sqrt(3 * 100)  # U(-1/sqrt(in), 1/sqrt(in))
    assert torch.equal(A, lora.lora_init(100, 30, 4, seed=0)[0])
    assert not torch.equal(A, lora.lora_init(100, 30, 4, seed=1)[0])


def test_forward_of_layer_equals_the_pure_function_and_zero_delta_at_init():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = lora.LoRALinear(base, r=3, lora_alpha=6)
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), base(x)), "B = 0: the wrapped layer must compute exactly the base layer"
    assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad and layer.scaling == 2.0
    randomize_adapters(nn.ModuleDict({"l": layer}))
    want = lora.lora_forward(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    assert torch.allclose(layer(x), want, atol=1e-6)
    manual = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(want, manual, atol=1e-6)
    assert not torch.allclose(layer(x), base(x), atol=1e-4)


def test_dropout_acts_on_the_adapter_path_only():
    layer = lora.LoRALinear(nn.Linear(6, 6), r=2, lora_alpha=2, lora_dropout=0.5).train()
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: dropout cannot reach the output
    with pytest.raises(ValueError, match="lora_dropout"):
        lora.LoRALinear(nn.Linear(6, 6), lora_dropout=1.0)
    with pytest.raises(ValueError, match="r must"):
        lora.LoRALinear(nn.Linear(6, 6), r=0)


@pytest.mark.parametrize("fields,field", [
    ({"r": 0}, "LoraConfig.r"), ({"r": 2.0}, "LoraConfig.r"), ({"r": True}, "LoraConfig.r"),
    ({"lora_alpha": 0}, "LoraConfig.lora_alpha"), ({"lora_alpha": float("inf")}, "LoraConfig.lora_alpha"),
    ({"lora_alpha": "16"}, "LoraConfig.lora_alpha"), ({"lora_dropout": 1.0}, "LoraConfig.lora_dropout"),
    ({"lora_dropout": -0.1}, "LoraConfig.lora_dropout"), ({"target_modules": ()}, "LoraConfig.target_modules"),
    ({"target_modules": ["q_proj", ""]}, "LoraConfig.target_modules"),
    ({"target_modules": [3]}, "LoraConfig.target_modules"),
    ({"layers_to_transform": ()}, "LoraConfig.layers_to_transform"),
    ({"layers_to_transform": [-1]}, "LoraConfig.layers_to_transform"),
    ({"layers_to_transform": [1.0]}, "LoraConfig.layers_to_transform"),
])
def test_lora_config_names_the_bad_field(fields, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        lora.LoraConfig(**fields)


def test_inject_takes_a_lora_config_or_its_fields_as_keywords():
    config = lora.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.25, target_modules="q_proj")
    assert config.target_modules == ("q_proj",) and config.scaling == 3.0
    by_config, by_keywords = Nested(), Nested()
    names = lora.inject(by_config, config)
    assert names == lora.inject(by_keywords, ["q_proj"], r=2, lora_alpha=6, lora_dropout=0.25)
    for model in (by_config, by_keywords):
        layer = model.get_submodule(names[0])
        assert (layer.r, layer.scaling, layer.lora_dropout.p) == (2, 3.0, 0.25)
    with pytest.raises(TypeError, match="LoraConfig and keywords"):
        lora.inject(Nested(), config, r=4)
    with pytest.raises(ValueError, match="LoraConfig.r"):
        lora.inject(Nested(), ["q_proj"], r=0)


def test_merge_parity_and_unmerge_restores_the_weight():
    torch.manual_seed(0)
    model = Nested()
    lora.inject(model, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    randomize_adapters(model)
    x = torch.randn(3, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(x)
    lora.merge(model)
    assert torch.allclose(model(x), unmerged, atol=1e-6)
    layer = model.blocks[0]["attn"].q_proj
    assert torch.allclose(layer.base_layer.weight,
                          lora.merged_weight(before["blocks.0.attn.q_proj.base_layer.weight"], layer.lora_A.weight,
                                             layer.lora_B.weight, layer.scaling))
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    lora.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k
    lora.merge_and_unload(model)
    assert not lora.lora_layers(model) and type(model.blocks[1]["attn"].v_proj) is nn.Linear
    assert torch.allclose(model(x), unmerged, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Injection


def test_match_targets_is_peft_suffix_rule_not_substring():
    names = ["blocks.0.attn.q_proj", "blocks.0.attn.xq_proj", "q_proj", "q_proj_extra", "blocks.0.attn"]
    assert lora.match_targets(names, ["q_proj"]) == ["blocks.0.attn.q_proj", "q_proj"]
    assert lora.match_targets(names, "attn") == ["blocks.0.attn"]


def test_inject_replaces_nested_layers_by_dotted_path():
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(3, 8)
    base_out = model(x)
    names = lora.inject(model, ["q_proj", "v_proj"], r=2)
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    for name in names:
        assert isinstance(model.get_submodule(name), lora.LoRALinear)
    assert type(model.blocks[0]["attn"].xq_proj) is nn.Linear
    assert torch.equal(model(x), base_out)  # zero delta at init, through the whole model
    randomize_adapters(model)
    assert not torch.allclose(model(x), base_out, atol=1e-4)  # the adapters really sit on the forward path
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject(model, ["k_proj"])


def test_dotted_setattr_trap_replaces_nothing_and_is_detected():
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(3, 8)
    base_out = model(x)
    name = "blocks.0.attn.q_proj"
    trap = lora.LoRALinear(model.get_submodule(name), r=2)
    setattr(model, name, trap)  # the popular snippet's mistake
    randomize_adapters(model)
    assert type(model.get_submodule(name)) is nn.Linear  # nothing was replaced...
    assert lora.trainable_parameters(model).trainable > 0  # ...yet the adapter's parameters are counted
    assert torch.equal(model(x), base_out)  # ...and can never change the output
    with pytest.raises(ValueError, match="dotted name"):
        lora.check_injection(model)
    with pytest.raises(ValueError, match="not a LoRALinear"):
        lora.check_injection(Nested(), [name])


def test_inject_refuses_conv1d_and_unmatched_targets():
    from transformers.pytorch_utils import Conv1D  # what GPT-2's attention projections are

    gpt2_like = nn.ModuleDict({"h": nn.ModuleList([nn.ModuleDict({"c_attn": Conv1D(48, 16)})])})
    with pytest.raises(ValueError, match="Conv1D.*transpose"):
        lora.inject(gpt2_like, ["c_attn"])
    with pytest.raises(ValueError, match="matched no module"):
        lora.inject(Nested(), ["query"])
    with pytest.raises(ValueError, match="base_layer"):
        lora.LoRALinear(nn.Conv1d(3, 3, 1))


def test_trainable_parameters_exact_count_and_percent():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    lora.inject(model, ["q_proj", "v_proj"], r=4)
    # per layer: q_proj 32 -> 32 and v_proj 32 -> 16 (2 KV heads of 8): r * (in + out) each
    want = 2 * 4 * ((32 + 32) + (32 + 16))
    report = lora.trainable_parameters(model)
    assert report.trainable == want
    assert report.total == total + want
    assert math.isclose(report.percent, 100 * want / (total + want))
    assert f"{want:,}" in str(report)


# ----------------------------------------------------------------------------------------
# Adapter files and peft


def test_adapter_save_load_round_trip(tmp_path):
    model = tiny_llama()
    lora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    randomize_adapters(model)
    x = torch.randint(0, 64, (2, 10))
    want = model(x).logits
    size = lora.save_adapter(model, tmp_path / "adapter.safetensors")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter.safetensors")
    assert set(saved) == set(lora.lora_state_dict(model)) and all(".lora_" in k for k in saved)
    assert size < 0.2 * sum(p.numel() * 4 for p in model.parameters())  # adapter weights only
    fresh = tiny_llama()  # same base weights (same seed), no adapters
    assert not torch.allclose(fresh(x).logits, want, atol=1e-4)
    names = lora.load_adapter(fresh, tmp_path / "adapter.safetensors")
    assert names == list(lora.lora_layers(model))
    layer = lora.lora_layers(fresh)[names[0]]
    assert (layer.r, layer.lora_alpha, layer.scaling) == (4, 8.0, 2.0)
    assert torch.allclose(fresh(x).logits, want, atol=1e-6)
    other = tiny_llama()
    lora.inject(other, ["k_proj"], r=4)
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_adapter(other, tmp_path / "adapter.safetensors")


def test_parity_with_peft_count_and_outputs():
    from peft import LoraConfig, get_peft_model

    ours, theirs = tiny_llama(), tiny_llama()
    lora.inject(ours, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert lora.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    assert lora.trainable_parameters(ours).total == theirs.get_nb_trainable_parameters()[1]
    randomize_adapters(ours)
    result = theirs.load_state_dict(lora.to_peft_state_dict(ours), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    theirs.eval()
    x = torch.randint(0, 64, (2, 12))
    want = ours(x).logits
    assert torch.allclose(theirs(input_ids=x).logits, want, atol=1e-5)
    lora.merge_and_unload(ours)
    merged = theirs.merge_and_unload()
    assert torch.allclose(merged(input_ids=x).logits, ours(x).logits, atol=1e-5)
    assert lora.to_peft_key("model.layers.0.self_attn.q_proj.lora_B.weight", "x") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.x.weight"


def test_layers_to_transform_wraps_the_blocks_peft_wraps():
    from peft import LoraConfig, get_peft_model

    ours = tiny_llama()
    names = lora.inject(ours, lora.LoraConfig(r=4, target_modules=("q_proj", "down_proj"), layers_to_transform=1))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]))
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert lora.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    with pytest.raises(ValueError, match="no target_modules match inside those blocks"):
        lora.inject(tiny_llama(), lora.LoraConfig(target_modules=("q_proj",), layers_to_transform=(7,)))


# ----------------------------------------------------------------------------------------
# Instruction tuning


def test_sft_example_shifts_masks_prompt_and_pads():
    x, y = lora.sft_example([1, 2, 3], [4, 5], max_len=6, pad_id=0)
    assert x.tolist() == [1, 2, 3, 4, 0, 0]
    assert y.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 4, 5, IGNORE_INDEX, IGNORE_INDEX]
    x, y = lora.sft_example([1, 2, 3], [4, 5, 6, 7], max_len=4, pad_id=0)  # truncated
    assert x.tolist() == [1, 2, 3, 4] and y.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 4, 5]
    assert x.dtype == y.dtype == torch.int64


def test_loss_ignores_prompt_positions():
    model = HFCausalLM(tiny_llama())
    x, y = lora.sft_example([5, 6, 7, 8, 9], [10, 11, 12], max_len=10, pad_id=0)
    x, y = x[None], y[None]
    logits, loss = model(x, y)
    keep = y[0] != IGNORE_INDEX
    want = F.cross_entropy(logits[0][keep], y[0][keep])
    assert keep.sum() == 3 and torch.allclose(loss, want)
    # the prompt positions get no gradient signal: the loss does not depend on their logits
    logits = logits.detach().requires_grad_()
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert torch.count_nonzero(logits.grad[0, :4]) == 0 and torch.count_nonzero(logits.grad[0, 4:7]) > 0
    assert math.isclose(lora.response_loss(model, [(x[0], y[0])]), loss.item(), rel_tol=1e-5)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from llmlab import assets

    return AutoTokenizer.from_pretrained(assets.resolve("smollm2-135m-instruct"))


def test_chat_template_examples_train_on_the_answer_only(smol_tokenizer):
    messages = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]
    prompt, response = lora.chat_ids(smol_tokenizer, messages)
    full = smol_tokenizer.apply_chat_template(messages, tokenize=False)
    assert smol_tokenizer.decode(prompt + response) == full
    assert smol_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert smol_tokenizer.decode(response).startswith("2 plus 3 is 5.<|im_end|>")
    [(x, y)] = lora.chat_dataset(smol_tokenizer, [messages], max_len=64)
    targets = y[y != IGNORE_INDEX].tolist()
    assert targets == response  # exactly the answer (and the end-of-turn), nothing of the prompt
    assert lora.chat_dataset(smol_tokenizer, [messages], max_len=len(prompt) - 1) == []  # no answer token fits
    with pytest.raises(ValueError, match="assistant"):
        lora.chat_ids(smol_tokenizer, messages[:1])


def test_lora_training_with_the_course_loop_moves_only_adapters():
    model = tiny_llama()
    lora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    gen = torch.Generator().manual_seed(0)
    data = [lora.sft_example(torch.randint(0, 64, (5,), generator=gen).tolist(), [7, 8, 9, 7, 8, 9], 12, 0)
            for _ in range(8)]
    wrapped = HFCausalLM(model)
    before = lora.response_loss(wrapped, data)
    history = train(wrapped, data, None, TrainConfig(max_steps=60, batch_size=8, lr=5e-2, min_lr=5e-3, warmup_steps=2,
                                                     eval_interval=0, device="cpu", progress=False))
    # (a random tiny model's small frozen lm_head caps how low this loss can go)
    assert lora.response_loss(wrapped, data) < before - 0.3 and len(history["loss"]) == 60
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), f"{k} is frozen but changed"


# ----------------------------------------------------------------------------------------
# Classification helpers


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = lora.mean_pool(h, mask)
    assert torch.allclose(out[0], h[0, :2].mean(0)) and torch.allclose(out[1], h[1].mean(0))


def test_confusion_matrix_and_macro_f1():
    cm = lora.confusion_matrix([0, 1, 1, 2, 2, 0], [0, 1, 2, 2, 2, 1], 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]  # rows: true class, columns: predicted
    f1 = [2 * 1 / (2 + 1), 2 * 1 / (2 + 2), 2 * 2 / (2 + 3)]
    assert math.isclose(lora.macro_f1(cm), sum(f1) / 3)
    assert lora.macro_f1(lora.confusion_matrix([0, 0], [0, 0], 2)) == 0.5  # class 1: never seen nor predicted


def test_encoder_classifier_trains_with_frozen_encoder_and_lora():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16))
    lora.inject(encoder, ["query", "value"], r=2)
    model = lora.EncoderClassifier(encoder, 2, pad_id=0)
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "head"}
    y = torch.arange(32) % 2
    x = torch.randint(1, 25, (32, 8)) + 25 * y[:, None]  # class 0: tokens 1-24, class 1: tokens 26-49
    x[:, 6:] = 0  # padding
    train(model, list(zip(x, y)), None, TrainConfig(max_steps=40, batch_size=16, lr=1e-2, min_lr=1e-3,
                                                    warmup_steps=2, eval_interval=0, device="cpu", progress=False))
    assert (model.predict(x) == y).float().mean() > 0.9


# ----------------------------------------------------------------------------------------
# Lab 3's instant-feedback checks: the notebook's solutions pass, typical mistakes are named


def _lab3_solutions() -> dict:
    import nbformat
    from conftest import ROOT

    nb = nbformat.read(ROOT / "solutions" / "03-finetuning" / "finetuning.ipynb", as_version=4)
    ns: dict = {"math": math, "torch": torch, "nn": nn, "F": F, "IGNORE_INDEX": IGNORE_INDEX}
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            exec(compile(cell.source, f"<solution {cell.metadata['nbgrader']['grade_id']}>", "exec"), ns)
    return ns


def test_lab3_solutions_pass_their_checks(capsys):
    from llmlab import checks

    s = _lab3_solutions()
    checks.check_lora_init(s["lora_init"])
    checks.check_lora_forward(s["lora_forward"])
    checks.check_merged_weight(s["merged_weight"])
    checks.check_match_targets(s["match_targets"])
    checks.check_lora_param_count(s["lora_param_count"])
    checks.check_sft_example(s["sft_example"])
    checks.check_to_peft_key(s["to_peft_key"])
    checks.check_mean_pool(s["mean_pool"])
    checks.check_classification_metrics(s["confusion_matrix"], s["macro_f1"])
    assert capsys.readouterr().out.count("✓") == 9


def _shifted_wrong(mask_extra: int = 0, pad_target: bool = False, shift: bool = True):
    def sft_example(p, r, max_len, pad):
        take = max_len + 1 if shift else max_len
        ids = (p + r)[:take]
        labels = ([IGNORE_INDEX] * (len(p) + mask_extra) + r[mask_extra:])[:take]
        x, y = (ids[:-1], labels[1:]) if shift else (ids, labels)
        fill = pad if pad_target else IGNORE_INDEX
        return x + [pad] * (max_len - len(x)), y + [fill] * (max_len - len(y))
    return sft_example


def _nan_f1(cm):
    cm = cm.double()
    tp = cm.diag()
    precision, recall = tp / cm.sum(0), tp / cm.sum(1)
    return float((2 * precision * recall / (precision + recall)).mean())


MISTAKES = [
    ("check_lora_init", (lambda i, o, r, s: (torch.zeros(r, i), torch.rand(o, r))), "the other way round"),
    ("check_lora_init", (lambda i, o, r, s: (torch.randn(r, i), torch.zeros(o, r))), "far too large"),
    ("check_lora_init", (lambda i, o, r, s: ((torch.rand(r, i) * 2 - 1) / o ** 0.5, torch.zeros(o, r))), "fan-in"),
    ("check_lora_forward", (lambda x, W, b, A, B, s: F.linear(x, W, b) + x @ A.T @ B.T), "not multiplied by `scaling`"),
    ("check_lora_forward", (lambda x, W, b, A, B, s: F.linear(x, W) + s * x @ A.T @ B.T), "bias"),
    ("check_merged_weight", (lambda W, A, B, s: W + B @ A), "forgets `scaling`"),
    ("check_merged_weight", (lambda W, A, B, s: W.add_(s * B @ A)), "in place"),
    ("check_match_targets", (lambda names, t: [n for n in names if any(x in n for x in t)]), "substring"),
    ("check_lora_param_count", (lambda sh, t, r: sum(r * o * i for n, (o, i) in sh.items() if n.split(".")[-1] in t)),
     "r \\* in \\* out"),
    ("check_sft_example", _shifted_wrong(shift=False), "not shifted"),
    ("check_sft_example", _shifted_wrong(mask_extra=1), "first response token"),
    ("check_sft_example", _shifted_wrong(pad_target=True), "padding positions"),
    ("check_to_peft_key", (lambda k, a: "base_model.model." + k), "adapters in a dict"),
    ("check_mean_pool", (lambda h, m: h.mean(1)), "padding positions too"),
    ("check_classification_metrics", (lambda p, y, n: lora.confusion_matrix(y, p, n), lora.macro_f1), "transposed"),
    ("check_classification_metrics", (lora.confusion_matrix, _nan_f1), "NaN"),
]


@pytest.mark.parametrize("check, fns, message", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)])
def test_lab3_mistakes_get_their_diagnostic(check, fns, message):
    from llmlab import checks

    fns = fns if isinstance(fns, tuple) else (fns,)
    with pytest.raises(AssertionError, match=message):
        getattr(checks, check)(*fns)
