"""Lab 3 (fine-tuning): the usual mistakes of each exercise, and right answers written otherwise."""
from __future__ import annotations

from catalogue import Answer, suite, tweak

UNIFORM = "lora_A = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound  # U(-bound, bound)"

ANSWERS = [
    # LoRA init
    tweak("lora-init", "b-random-a-zero", UNIFORM, "lora_A = torch.zeros(r, in_features)",
          "lora_B = torch.zeros(out_features, r)", "lora_B = torch.rand(out_features, r, generator=generator) * bound",
          words="the other way round"),
    tweak("lora-init", "both-zero", UNIFORM, "lora_A = torch.zeros(r, in_features)", words="lora_A is zero too"),
    tweak("lora-init", "randn", UNIFORM, "lora_A = torch.randn(r, in_features, generator=generator)", words="far too large"),
    tweak("lora-init", "transposed-shapes", UNIFORM, "lora_A = (torch.rand(in_features, r, generator=generator) * 2 - 1) * bound",
          "lora_B = torch.zeros(out_features, r)", "lora_B = torch.zeros(r, out_features)", words="(out_features, in_features)"),
    tweak("lora-init", "seed-ignored", "generator = torch.Generator().manual_seed(seed)", "generator = torch.Generator().manual_seed(0)",
          words="use the seed"),
    tweak("lora-init", "fan-out-bound", "bound = 1 / math.sqrt(in_features)", "bound = 1 / math.sqrt(out_features)",
          words="1/sqrt(out_features)"),
    Answer("lora-init", "kaiming-uniform", """
def lora_init(in_features, out_features, r, seed=0):
    lora_A = torch.empty(r, in_features)
    torch.nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return lora_A, torch.zeros(out_features, r, dtype=torch.float32)
"""),
    Answer("lora-init", "uniform", """
def lora_init(in_features, out_features, r, seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    b = in_features ** -0.5
    return torch.empty(r, in_features).uniform_(-b, b, generator=g), torch.zeros((out_features, r))
"""),
    # LoRA forward
    tweak("lora-forward", "no-scaling", "base + scaling * (", "base + (", words="not multiplied by `scaling`"),
    tweak("lora-forward", "divided-by-scaling", "base + scaling * ((x @ lora_A.T) @ lora_B.T)",
          "base + ((x @ lora_A.T) @ lora_B.T) / scaling", words="divided by `scaling`"),
    tweak("lora-forward", "update-only", "return base + scaling", "return scaling", words="returns only the low-rank update"),
    tweak("lora-forward", "bias-forgotten", "        base = base + bias\n", "        pass\n", words="bias of the base layer is missing"),
    tweak("lora-forward", "bias-none-crashes", "    if bias is not None:\n        base = base + bias", "    base = base + bias",
          words="raised TypeError"),
    Answer("lora-forward", "f-linear", """
def lora_forward(x, weight, bias, lora_A, lora_B, scaling):
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * scaling
"""),
    Answer("lora-forward", "einsum", """
def lora_forward(x, weight, bias, lora_A, lora_B, scaling):
    y = torch.einsum("...i,oi->...o", x, weight)
    low = torch.einsum("...r,or->...o", torch.einsum("...i,ri->...r", x, lora_A), lora_B)
    return y + scaling * low + (0 if bias is None else bias)
"""),
    # target matching
    tweak("match-targets", "substring", 'name == t or name.endswith("." + t)', "t in name", words="a substring test"),
    tweak("match-targets", "endswith-without-dot", 'name == t or name.endswith("." + t)', "name.endswith(t)",
          words="a substring test"),
    tweak("match-targets", "last-part-only", 'name == t or name.endswith("." + t)', 'name.split(".")[-1] == t',
          words="misses"),
    Answer("match-targets", "target-order", """
def match_targets(names, target_modules):
    out = []
    for t in target_modules:
        out += [n for n in names if n == t or n.endswith("." + t)]
    return out
""", words="keep the order of `names`"),
    Answer("match-targets", "exact-only", """
def match_targets(names, target_modules):
    return [n for n in names if n in target_modules]
""", words="misses"),
    Answer("match-targets", "loop", """
def match_targets(names, target_modules):
    found = []
    for name in names:
        for t in target_modules:
            if (name == t or name.endswith("." + t)) and name not in found:
                found.append(name)
    return found
"""),
    Answer("match-targets", "split-parts", """
def match_targets(names, target_modules):
    def hit(name, target):
        parts, want = name.split("."), target.split(".")
        return parts[-len(want):] == want
    return [n for n in names if any(hit(n, t) for t in target_modules)]
"""),
    # parameter count
    tweak("param-count", "r-in-out", "r * (linear_shapes[name][0] + linear_shapes[name][1])",
          "r * linear_shapes[name][0] * linear_shapes[name][1]", words="counts r * in * out"),
    tweak("param-count", "every-linear", "matched = match_targets(list(linear_shapes), target_modules)",
          "matched = list(linear_shapes)", words="counts every Linear layer"),
    tweak("param-count", "only-A", "(linear_shapes[name][0] + linear_shapes[name][1])", "linear_shapes[name][1]",
          words="counts only one of lora_A and lora_B"),
    tweak("param-count", "float", "return sum(", "return 1.0 * sum(", words="expected an int"),
    Answer("param-count", "loop", """
def lora_param_count(linear_shapes, target_modules, r):
    total = 0
    for name in match_targets(list(linear_shapes), target_modules):
        out_features, in_features = linear_shapes[name]
        total += r * in_features + out_features * r  # lora_A (r, in) + lora_B (out, r)
    return total
"""),
    Answer("param-count", "tensor-sum", """
def lora_param_count(linear_shapes, target_modules, r):
    names = match_targets(list(linear_shapes), target_modules)
    if not names:
        return 0
    shapes = torch.tensor([linear_shapes[n] for n in names])
    return int(shapes.sum()) * r
"""),
    # SFT example
    tweak("sft-example", "unshifted", "x, y = ids[:-1], labels[1:]", "x, y = ids[:-1], labels[:-1]", words="y is not shifted"),
    tweak("sft-example", "prompt-kept", "labels = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))",
          "labels = (list(prompt_ids) + list(response_ids))", words="prompt tokens are kept as targets"),
    tweak("sft-example", "pad-as-target", "y + [IGNORE_INDEX] * pad", "y + [pad_id] * pad", words="the padding positions of y"),
    tweak("sft-example", "first-response-masked", "labels = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))",
          "labels = ([IGNORE_INDEX] * (len(prompt_ids) + 1) + list(response_ids)[1:])", words="the first response token"),
    tweak("sft-example", "not-cut", "[: max_len + 1]\n    labels", "\n    labels", "[: max_len + 1]\n    x, y", "\n    x, y",
          words="both must be padded/cut to max_len"),
    Answer("sft-example", "tensors", """
def sft_example(prompt_ids, response_ids, max_len, pad_id):
    ids = torch.tensor(list(prompt_ids) + list(response_ids))[: max_len + 1]
    labels = ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    x = torch.full((max_len,), pad_id, dtype=torch.long)
    y = torch.full((max_len,), IGNORE_INDEX, dtype=torch.long)
    x[: len(ids) - 1] = ids[:-1]
    y[: len(ids) - 1] = labels[1:]
    return x, y
"""),
    Answer("sft-example", "loop", """
def sft_example(prompt_ids, response_ids, max_len, pad_id):
    seq = list(prompt_ids) + list(response_ids)
    x, y = [], []
    for t in range(max_len):
        real = t + 1 < len(seq)
        x.append(seq[t] if real else pad_id)
        y.append(seq[t + 1] if real and t + 1 >= len(prompt_ids) else IGNORE_INDEX)
    return torch.tensor(x, dtype=torch.int64), torch.tensor(y, dtype=torch.int64)
"""),
    # merged weight
    tweak("merge", "no-scaling", "(scaling * (lora_B @ lora_A))", "(lora_B @ lora_A)", words="forgets `scaling`"),
    tweak("merge", "update-only", "return weight + (", "return (", words="returns only the update"),
    tweak("merge", "in-place", "return weight + (scaling * (lora_B @ lora_A)).to(weight.dtype)",
          "return weight.add_((scaling * (lora_B @ lora_A)).to(weight.dtype))", words="in place"),
    tweak("merge", "dtype-promoted", "(scaling * (lora_B @ lora_A)).to(weight.dtype)", "scaling * (lora_B @ lora_A)",
          words="keep weight's dtype"),
    tweak("merge", "transposed-update", "return weight + (scaling * (lora_B @ lora_A)).to(weight.dtype)",
          "return weight.T + (scaling * (lora_A.T @ lora_B.T)).to(weight.dtype)", words="transposed"),
    Answer("merge", "addmm", """
def merged_weight(weight, lora_A, lora_B, scaling):
    return torch.addmm(weight.float(), lora_B.float(), lora_A.float(), alpha=scaling).to(weight.dtype) \\
        if weight.dtype != torch.float64 else torch.addmm(weight, lora_B.double(), lora_A.double(), alpha=scaling)
"""),
    Answer("merge", "einsum", """
def merged_weight(weight, lora_A, lora_B, scaling):
    update = torch.einsum("or,ri->oi", lora_B, lora_A) * scaling
    return (weight.to(update.dtype) + update).to(weight.dtype) if weight.dtype == torch.bfloat16 else weight + update.to(weight.dtype)
"""),
    # peft key
    tweak("peft-key", "no-prefix", 'return "base_model.model." + key', "return key", words="keys start with 'base_model.model.'"),
    tweak("peft-key", "single-prefix", 'return "base_model.model." + key', 'return "base_model." + key',
          words="keys start with 'base_model.model.'"),
    tweak("peft-key", "no-adapter-name", "        key = key[: -len(\"weight\")] + adapter_name + \".weight\"\n", "        pass\n",
          words="peft keeps adapters in a dict by name"),
    tweak("peft-key", "every-key-renamed", '    if key.endswith(("lora_A.weight", "lora_B.weight")):\n', "    if True:\n",
          words="for lora_A / lora_B weights only"),
    Answer("peft-key", "replace", """
def to_peft_key(key, adapter_name="default"):
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.weight", f".{part}.{adapter_name}.weight")
    return f"base_model.model.{key}"
"""),
    Answer("peft-key", "split", """
def to_peft_key(key, adapter_name="default"):
    parts = key.split(".")
    if len(parts) > 1 and parts[-2] in ("lora_A", "lora_B"):
        parts.insert(len(parts) - 1, adapter_name)
    return ".".join(["base_model", "model"] + parts)
"""),
    # mean pooling
    tweak("mean-pool", "padding-averaged", "(hidden_states * mask).sum(dim=1) / mask.sum(dim=1)", "hidden_states.mean(dim=1)",
          words="averages the padding positions too"),
    tweak("mean-pool", "sum", "(hidden_states * mask).sum(dim=1) / mask.sum(dim=1)", "(hidden_states * mask).sum(dim=1)",
          words="returns the sum"),
    tweak("mean-pool", "padded-length", "/ mask.sum(dim=1)", "/ hidden_states.shape[1]", words="divides by the padded length"),
    tweak("mean-pool", "cls", "return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1)", "return hidden_states[:, 0]",
          words="[CLS] pooling"),
    tweak("mean-pool", "wrong-axis", "(hidden_states * mask).sum(dim=1) / mask.sum(dim=1)",
          "(hidden_states * mask).mean(dim=-1)", words="averaged over the hidden axis"),
    Answer("mean-pool", "einsum", """
def mean_pool(hidden_states, attention_mask):
    m = attention_mask.to(hidden_states.dtype)
    return torch.einsum("bth,bt->bh", hidden_states, m) / m.sum(-1, keepdim=True)
"""),
    Answer("mean-pool", "loop", """
def mean_pool(hidden_states, attention_mask):
    rows = [h[m.bool()].mean(dim=0) for h, m in zip(hidden_states, attention_mask)]
    return torch.stack(rows)
"""),
    # classification metrics
    tweak("metrics", "transposed", "cm[int(y), int(p)] += 1", "cm[int(p), int(y)] += 1", words="transposed"),
    tweak("metrics", "accuracy", "    return float(f1.mean())", "    return float(tp.sum() / confusion.sum())", words="returns the accuracy"),
    tweak("metrics", "nan-for-unpredicted", "f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))",
          "precision, recall = tp / confusion.sum(0), tp / confusion.sum(1)\n    f1 = 2 * precision * recall / (precision + recall)",
          words="NaN for"),
    tweak("metrics", "mean-of-p-and-r", "f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))",
          "f1 = (tp / confusion.sum(0).clamp(min=1) + tp / confusion.sum(1).clamp(min=1)) / 2",
          words="HARMONIC mean"),
    tweak("metrics", "size-from-data", "cm = torch.zeros(n_classes, n_classes, dtype=torch.int64)",
          "n = max(max(preds), max(labels)) + 1\n    cm = torch.zeros(n, n, dtype=torch.int64)", words="must still be 5 x 5"),
    Answer("metrics", "bincount", """
def confusion_matrix(preds, labels, n_classes):
    p, y = torch.as_tensor(preds).long(), torch.as_tensor(labels).long()
    return torch.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def macro_f1(confusion):
    scores = []
    for c in range(len(confusion)):
        tp = float(confusion[c][c])
        fp = float(sum(confusion[i][c] for i in range(len(confusion)))) - tp
        fn = float(sum(confusion[c])) - tp
        scores.append(0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)
"""),
    Answer("metrics", "precision-recall", """
def macro_f1(confusion):
    c = torch.as_tensor(confusion, dtype=torch.float64)
    tp = c.diagonal()
    precision = torch.where(c.sum(0) > 0, tp / c.sum(0), torch.zeros_like(tp))
    recall = torch.where(c.sum(1) > 0, tp / c.sum(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    return f1.mean().item()
"""),
]

BLAMES = [("match-targets/exact-only", "param-count", "uses your match_targets")]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("03-finetuning", ANSWERS, BLAMES)
