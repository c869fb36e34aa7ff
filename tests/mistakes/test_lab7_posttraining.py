"""Lab 7 (post-training and evaluation): the usual mistakes of each exercise, and right answers written otherwise."""
from __future__ import annotations

from catalogue import Answer, suite, tweak

SHIFTED = "logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): position t predicts token t + 1"
PICK = "picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)"
LOSSES = "losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))"

ANSWERS = [
    # log-probs
    tweak("logprobs", "no-shift", SHIFTED, "logp = torch.log_softmax(logits[:, 1:], dim=-1)", words="position t predicts token t + 1"),
    tweak("logprobs", "softmax", SHIFTED, "logp = torch.softmax(logits[:, :-1], dim=-1)", words="probabilities, not log-probabilities"),
    tweak("logprobs", "wrong-axis", SHIFTED, "logp = torch.log_softmax(logits, dim=1)[:, :-1]", words="wrong axis"),
    tweak("logprobs", "raw-logits", SHIFTED, "logp = logits[:, :-1]", words="raw logits"),
    tweak("logprobs", "prompt-counted", "total = (token_logprobs(logits, input_ids) * mask).sum(dim=1)",
          "total = token_logprobs(logits, input_ids).sum(dim=1)", words="sums over every token"),
    tweak("logprobs", "mean-over-length", "return total / mask.sum(dim=1) if average else total",
          "return total / mask.shape[1] if average else total", words="divides by the whole length"),
    tweak("logprobs", "average-flag-inverted", "return total / mask.sum(dim=1) if average else total",
          "return total if average else total / mask.sum(dim=1)", words="returns the"),
    tweak("logprobs", "no-zero-column", "return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)", "return picked",
          words="(B, T), with 0 at t = 0"),
    Answer("logprobs", "cross-entropy", """
def token_logprobs(logits, input_ids):
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1), reduction="none")
    return F.pad(-nll.view(B, T - 1), (1, 0))
"""),
    Answer("logprobs", "loops-and-where", """
def token_logprobs(logits, input_ids):
    out = torch.zeros(input_ids.shape, dtype=logits.dtype)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    for t in range(1, input_ids.shape[1]):
        out[:, t] = logp[:, t - 1].gather(-1, input_ids[:, t:t + 1]).squeeze(-1)
    return out


def sequence_logprobs(logits, input_ids, response_mask, average=False):
    lp = torch.where(response_mask.bool(), token_logprobs(logits, input_ids), torch.zeros((), dtype=logits.dtype))
    return lp.sum(-1) / (response_mask.sum(-1) if average else 1)
"""),
    # Bradley-Terry
    tweak("reward-loss", "swapped", "chosen_rewards - rejected_rewards", "rejected_rewards - chosen_rewards", words="swapped"),
    tweak("reward-loss", "no-minus", "return -F.logsigmoid", "return F.logsigmoid", words="the sign is missing"),
    tweak("reward-loss", "sum", ".mean()", ".sum()", words="the sum over pairs"),
    tweak("reward-loss", "unstable", "return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()",
          "return -torch.log(torch.sigmoid(chosen_rewards - rejected_rewards)).mean()", words="underflows"),
    tweak("reward-loss", "sigmoid-only", "return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()",
          "return (1 - torch.sigmoid(chosen_rewards - rejected_rewards)).mean()", words="uses the sigmoid itself"),
    Answer("reward-loss", "softplus", """
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    return F.softplus(rejected_rewards - chosen_rewards).mean()
"""),
    Answer("reward-loss", "logaddexp", """
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    gap = chosen_rewards - rejected_rewards
    return torch.logaddexp(torch.zeros_like(gap), -gap).sum() / gap.numel()
"""),
    # DPO
    tweak("dpo", "rewards-without-beta", "return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()",
          "return losses, chosen_logratios.detach(), rejected_logratios.detach()", words="lack beta"),
    tweak("dpo", "no-reference", "chosen_logratios = policy_chosen_logps - ref_chosen_logps",
          "chosen_logratios = policy_chosen_logps", "rejected_logratios = policy_rejected_logps - ref_rejected_logps",
          "rejected_logratios = policy_rejected_logps", words="ignore the reference"),
    tweak("dpo", "beta-outside", LOSSES, "losses = -F.logsigmoid(chosen_logratios - rejected_logratios)",
          words="beta is missing inside the sigmoid"),
    tweak("dpo", "favours-rejected", LOSSES, "losses = -F.logsigmoid(beta * (rejected_logratios - chosen_logratios))",
          words="favour the rejected"),
    tweak("dpo", "mean-loss", "return losses, beta", "return losses.mean(), beta", words="per pair"),
    tweak("dpo", "swapped-outputs", "return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()",
          "return losses, beta * rejected_logratios.detach(), beta * chosen_logratios.detach()", words="swapped in the return"),
    tweak("dpo", "in-place", "chosen_logratios = policy_chosen_logps - ref_chosen_logps",
          "chosen_logratios = policy_chosen_logps.sub_(ref_chosen_logps)", words="in place"),
    Answer("dpo", "rewards-first", """
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return F.softplus(rejected - chosen), chosen, rejected
"""),
    Answer("dpo", "log-sigmoid-by-hand", """
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    z = beta * ((policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps))
    losses = torch.log1p(torch.exp(-z.abs())) + torch.clamp(-z, min=0)
    return losses, beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)
"""),
    # the verifier
    tweak("verifier", "first-number", "dollar, number, word = matches[-1].groups()", "dollar, number, word = matches[0].groups()",
          words="LAST one"),
    tweak("verifier", "commas-kept", 'float(number.replace(",", ""))', "float(number)", words="raised ValueError"),
    tweak("verifier", "case-sensitive", 'unit = "$" if dollar else (word or "").lower()', 'unit = "$" if dollar else (word or "")',
          words="lower-case the unit word"),
    tweak("verifier", "dollar-ignored", 'unit = "$" if dollar else (word or "").lower()', 'unit = (word or "").lower()',
          words="makes the unit '$'"),
    tweak("verifier", "unit-ignored", "    if want[1] and got[1] != want[1]:\n        return False\n", "",
          words="the reference has a unit, the prediction none"),
    tweak("verifier", "exact-equality", "return math.isclose(got[0], want[0], rel_tol=1e-6)", "return got[0] == want[0]",
          words="relative 1e-6"),
    tweak("verifier", "bare-reference-strict", "if want[1] and got[1] != want[1]:", "if got[1] != want[1]:",
          words="a reference without a unit accepts any"),
    tweak("verifier", "unknown-word-as-unit", 'base, factor = UNITS.get(unit, ("", 1.0))', 'base, factor = UNITS.get(unit, (unit, 1.0))',
          words="a word that is not in UNITS means no unit"),
    Answer("verifier", "loop-over-matches", """
def parse_quantity(text):
    last = None
    for m in QUANTITY.finditer(text):
        last = m
    if last is None:
        return None
    value = float(last.group(2).replace(",", ""))
    if last.group(1):
        return value, "$"
    word = (last.group(3) or "").lower()
    if word in UNITS:
        return value * UNITS[word][1], UNITS[word][0]
    return value, ""
"""),
    Answer("verifier", "relative-by-hand", """
def verify(prediction, reference):
    got, want = parse_quantity(prediction), parse_quantity(reference)
    if got is None or want is None or (want[1] != "" and want[1] != got[1]):
        return False
    return abs(got[0] - want[0]) <= 1e-6 * max(abs(got[0]), abs(want[0]), 1e-12)
"""),
    # advantages
    tweak("advantages", "batch-normalised", "grouped = rewards.view(-1, group_size)  # (prompts, G)", "grouped = rewards.view(1, -1)",
          words="over the whole batch"),
    tweak("advantages", "population-std", "grouped.std(dim=1, keepdim=True)", "grouped.std(dim=1, keepdim=True, unbiased=False)",
          words="population std"),
    tweak("advantages", "strided-groups", "grouped = rewards.view(-1, group_size)  # (prompts, G)",
          "grouped = rewards.view(group_size, -1).T", "return ((grouped - mean) / (std + 1e-4)).reshape(-1)",
          "return ((grouped - mean) / (std + 1e-4)).T.reshape(-1)", words="consecutive"),
    tweak("advantages", "no-epsilon", "(std + 1e-4)", "std", words="add 1e-4"),
    tweak("advantages", "centred-only", "return ((grouped - mean) / (std + 1e-4)).reshape(-1)", "return (grouped - mean).reshape(-1)",
          words="only subtracts the group mean"),
    Answer("advantages", "loop", """
def group_advantages(rewards, group_size):
    out = []
    for start in range(0, len(rewards), group_size):
        g = rewards[start:start + group_size]
        out.append((g - g.mean()) / (g.std() + 1e-4))
    return torch.cat(out)
"""),
    Answer("advantages", "by-formula", """
def group_advantages(rewards, group_size):
    g = rewards.reshape(-1, group_size)
    centred = g - g.mean(-1, keepdim=True)
    std = (centred.pow(2).sum(-1, keepdim=True) / (group_size - 1)).sqrt()
    return (centred / (std + 1e-4)).flatten()
"""),
    # GRPO loss
    tweak("grpo", "max", "objective = torch.minimum(", "objective = torch.maximum(", words="takes the max"),
    tweak("grpo", "no-clip", "objective = torch.minimum(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * A)",
          "objective = ratio * A", words="not clipped"),
    tweak("grpo", "kl-sign", "per_token = -(objective - beta * kl)", "per_token = -(objective + beta * kl)", words="wrong sign"),
    tweak("grpo", "k1-kl", "kl = torch.exp(d) - d - 1", "kl = -d", words="k3 estimate"),
    tweak("grpo", "global-token-mean", "return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()",
          "return (per_token * mask).sum() / mask.sum()", words="all tokens of the batch"),
    tweak("grpo", "padding-counted", "return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()",
          "return per_token.mean(dim=1).mean()", words="counts the padding"),
    tweak("grpo", "objective-not-loss", "per_token = -(objective - beta * kl)", "per_token = objective - beta * kl",
          words="returns the objective"),
    Answer("grpo", "where-and-clip", """
def grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, beta=0.04):
    ratio = (logps - old_logps).exp()
    A = advantages[:, None]
    unclipped, clipped = ratio * A, ratio.clip(1 - epsilon, 1 + epsilon) * A
    objective = torch.where(unclipped < clipped, unclipped, clipped)
    kl = (ref_logps - logps).exp() - (ref_logps - logps) - 1
    per_token = (beta * kl - objective) * mask
    return (per_token.sum(-1) / mask.sum(-1)).sum() / len(advantages)
"""),
    Answer("grpo", "per-row-loop", """
def grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, beta=0.04):
    rows = []
    for i in range(logps.shape[0]):
        keep = mask[i].bool()
        lp, old, ref = logps[i][keep], old_logps[i][keep], ref_logps[i][keep]
        ratio = torch.exp(lp - old)
        obj = torch.min(ratio * advantages[i], torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages[i])
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        rows.append(-(obj - beta * kl).mean())
    return torch.stack(rows).mean()
"""),
    # multiple choice
    tweak("mc", "argmin", "acc = max(range(len(logprobs)), key=lambda i: logprobs[i])",
          "acc = min(range(len(logprobs)), key=lambda i: logprobs[i])", words="the highest log-likelihood wins"),
    tweak("mc", "acc-normalised", "acc = max(range(len(logprobs)), key=lambda i: logprobs[i])",
          "acc = max(range(len(logprobs)), key=lambda i: logprobs[i] / n_bytes[i])", words="acc uses the raw"),
    tweak("mc", "norm-raw", "norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / n_bytes[i])",
          "norm = acc", words="acc_norm divides each"),
    tweak("mc", "norm-multiplies", "logprobs[i] / n_bytes[i]", "logprobs[i] * n_bytes[i]", words="does not multiply"),
    tweak("mc", "ties-last", "acc = max(range(len(logprobs)), key=lambda i: logprobs[i])",
          "acc = max(range(len(logprobs)), key=lambda i: (logprobs[i], i))", words="on ties take the first index"),
    Answer("mc", "torch-argmax", """
def choose(logprobs, n_bytes):
    lp = torch.tensor(logprobs, dtype=torch.float64)
    return int(torch.argmax(lp)), int(torch.argmax(lp / torch.tensor(n_bytes, dtype=torch.float64)))
"""),
    Answer("mc", "index-of-max", """
def choose(logprobs, n_bytes):
    per_byte = [lp / nb for lp, nb in zip(logprobs, n_bytes)]
    return logprobs.index(max(logprobs)), per_byte.index(max(per_byte))
"""),
    # pass@k and Wilson
    tweak("stats", "plug-in", "    if n - c < k:\n        return 1.0\n    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))",
          "    return 1.0 - (1.0 - c / n) ** k", words="biased plug-in"),
    tweak("stats", "pass-at-1", "    if n - c < k:\n        return 1.0\n    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))",
          "    return c / n", words="c/n is pass@1 only"),
    tweak("stats", "all-pass", "    if n - c < k:\n        return 1.0\n    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))",
          "    return math.comb(c, k) / math.comb(n, k)", words="ALL k samples"),
    tweak("stats", "wald", "    centre = (p + z * z / (2 * n)) / (1 + z * z / n)\n"
          "    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))",
          "    centre = p\n    half = z * math.sqrt(p * (1 - p) / n)", words="Wald"),
    tweak("stats", "z-not-squared", "centre = (p + z * z / (2 * n)) / (1 + z * z / n)", "centre = (p + z / (2 * n)) / (1 + z / n)",
          words="z^2 terms"),
    tweak("stats", "uncentred", "return max(0.0, centre - half), min(1.0, centre + half)",
          "return max(0.0, p - half), min(1.0, p + half)", words="the centre is"),
    Answer("stats", "binomials", """
def pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def wilson_interval(successes, n, z=1.96):
    p, z2 = successes / n, z ** 2
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n ** 2))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
"""),
    Answer("stats", "loop-product", """
def pass_at_k(n, c, k):
    if c == 0:
        return 0.0
    miss = 1.0
    for i in range(k):
        miss *= max(0.0, (n - c - i) / (n - i))
    return 1.0 - miss
"""),
]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("07-posttraining", ANSWERS)
