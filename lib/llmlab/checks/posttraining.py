"""Checks for lab 7 (post-training and evaluation): log-probs, the Bradley-Terry and DPO losses,
the verifier, GRPO's advantages and loss, multiple-choice decisions, pass@k and Wilson intervals.
References come from `llmlab.align` and `llmlab.evaluate`; the grader refuses student code that calls them."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.checks._core import (as_float, call, close, expect_tensor, fail, max_err, ok, randn, snapshot,
                                 unchanged, wrong_number)
from llmlab.i18n import _

__all__ = ['check_logprobs', 'check_bradley_terry_loss', 'check_dpo_loss', 'check_verify', 'check_group_advantages',
           'check_grpo_loss', 'check_choose', 'check_eval_stats']


def _scalar_tensor(name: str, out: Any, dtype: torch.dtype) -> Tensor:
    """A loss: a one-element tensor of `dtype`, or a clear failure."""
    if not isinstance(out, Tensor):
        fail(name, _("returns {type}; a loss is a torch tensor (it carries the gradient)").format(type=type(out).__name__))
    if out.numel() != 1:
        fail(name, _("returns shape {shape}; expected one number (0-dim): average over the batch").format(shape=tuple(out.shape)))
    if out.dtype != dtype:
        fail(name, _("returns dtype {dtype} for {dtype2} inputs; keep the input dtype").format(dtype=out.dtype, dtype2=dtype))
    return out.reshape(())


# ----------------------------------------------------------------------------------------
# Log-probabilities


def _check_token_logprobs(fn: Callable) -> None:
    from llmlab import align

    name = "token_logprobs"
    gen = torch.Generator().manual_seed(61)
    B, T, V = 2, 6, 9
    logits, ids = randn(gen, B, T, V) * 2, torch.randint(0, V, (B, T), generator=gen)
    before = snapshot([logits, ids])
    out = expect_tensor(name, call(name, fn, logits, ids), (B, T), logits.dtype, _("logits {value}, input_ids {value2}").format(value=(B, T, V), value2=(B, T)),
                        {(B, T - 1): _("one per token of input_ids: (B, T), with 0 at t = 0"),
                         (B, T, V): _("pick each token's entry (gather along the vocabulary axis)")})
    unchanged(name, before, [logits, ids], _("logits or input_ids"))
    want = align.token_logprobs(logits, ids)
    if close(out, want, 1e-9):
        return
    logp = torch.log_softmax(logits, -1)
    same_t = logp.gather(-1, ids[..., None]).squeeze(-1)
    if close(out[:, 1:], same_t[:, 1:], 1e-9) or close(out, same_t, 1e-9):
        fail(name, _("scores the token at t with the logits at t; position t predicts token t + 1, so the "
                     "token at t is scored by logits[:, t - 1]"))
    if close(out[:, 1:].exp(), want[:, 1:], 1e-9) or close(out[:, 1:], want[:, 1:].exp(), 1e-9):
        fail(name, _("returns probabilities, not log-probabilities (log_softmax, not softmax)"))
    wrong_axis = torch.log_softmax(logits, 1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    if close(out[:, 1:], wrong_axis, 1e-9):
        fail(name, _("log_softmax over the wrong axis: normalise over the vocabulary (dim=-1)"))
    raw = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    if close(out[:, 1:], raw, 1e-9):
        fail(name, _("returns the raw logits of the tokens; normalise them first (log_softmax over the "
                     "vocabulary)"))
    if close(out[:, 1:], want[:, 1:], 1e-9):
        fail(name, _("position 0 should be 0 (no position predicts the first token); got {tolist}").format(tolist=out[:, 0].tolist()))
    fail(name, _("differs from log_softmax(logits[:, t - 1])[input_ids[:, t]] (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))


def _check_sequence_logprobs(fn: Callable) -> None:
    from llmlab import align

    name = "sequence_logprobs"
    gen = torch.Generator().manual_seed(62)
    B, T, V = 3, 8, 7
    logits, ids = randn(gen, B, T, V) * 2, torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 0]])
    tok = align.token_logprobs(logits, ids)
    for average in (False, True):
        before = snapshot([logits, ids, mask])
        out = expect_tensor(name, call(name, fn, logits, ids, mask, average), (B,), logits.dtype,
                            _("logits {value}, response_mask {value2}").format(value=(B, T, V), value2=(B, T)),
                            {(B, T): _("one number per sequence: reduce over the tokens (dim=1)")})
        unchanged(name, before, [logits, ids, mask], _("an input"))
        want = align.sequence_logprobs(logits, ids, mask, average)
        if close(out, want, 1e-9):
            continue
        label = _("with average=True") if average else _("with average=False")
        if close(out, tok.sum(1) / (T if average else 1), 1e-9):
            fail(name, _("{label}: sums over every token; only the response tokens count (multiply by "
                         "response_mask)").format(label=label))
        if average and close(out, (tok * mask).sum(1) / T, 1e-9):
            fail(name, _("with average=True: divides by the whole length T; the mean is per response token "
                         "(divide by the number of ones in each row of response_mask)"))
        if close(out, align.sequence_logprobs(logits, ids, mask, not average), 1e-9):
            fail(name, _("{label}: returns the {value}; average=True is the mean per response token, "
                         "average=False the sum").format(label=label, value=_("sum") if average else _("mean")))
        shifted = torch.cat([mask[:, 1:], torch.zeros(B, 1, dtype=mask.dtype)], 1)
        if close(out, align.sequence_logprobs(logits, ids, shifted, average), 1e-9):
            fail(name, _("{label}: the mask is shifted by one; token_logprobs is aligned with input_ids, so "
                         "response_mask applies to it as it is").format(label=label))
        fail(name, _("{label}: differs from the masked {value} of token log-probs (max |error| {max_err:.2e})").format(label=label, value=_("mean") if average else _("sum"), max_err=max_err(out, want)))


def check_logprobs(token_fn: Callable, sequence_fn: Callable) -> None:
    """Check token_logprobs(logits, input_ids) and sequence_logprobs(logits, input_ids, response_mask, average)."""
    _check_token_logprobs(token_fn)  # first: sequence_logprobs builds on it
    _check_sequence_logprobs(sequence_fn)
    ok(_("token_logprobs and sequence_logprobs: each token scored by the position before it, prompt and "
         "padding masked"))


# ----------------------------------------------------------------------------------------
# Bradley-Terry


def check_bradley_terry_loss(fn: Callable) -> None:
    """Check bradley_terry_loss(chosen_rewards, rejected_rewards)."""
    name = "bradley_terry_loss"
    gen = torch.Generator().manual_seed(63)
    c, r = randn(gen, 6), randn(gen, 6)
    before = snapshot([c, r])
    out = _scalar_tensor(name, call(name, fn, c, r), c.dtype)
    unchanged(name, before, [c, r], _("the rewards"))
    want = -F.logsigmoid(c - r).mean()
    if not close(out, want, 1e-9):
        if close(out, -F.logsigmoid(r - c).mean(), 1e-9):
            fail(name, _("chosen and rejected are swapped: the loss must fall as the chosen reward rises above "
                         "the rejected"))
        if close(out, F.logsigmoid(c - r).mean(), 1e-9):
            fail(name, _("the sign is missing: the loss is MINUS the mean log-likelihood of the preferences "
                         "(it is >= 0)"))
        if close(out, -F.logsigmoid(c - r).sum(), 1e-9):
            fail(name, _("returns the sum over pairs; take the mean, so the loss does not grow with the batch "
                         "size"))
        if close(out, -torch.sigmoid(c - r).mean(), 1e-9) or close(out, (1 - torch.sigmoid(c - r)).mean(), 1e-9):
            fail(name, _("uses the sigmoid itself; the loss is -log sigmoid(chosen - rejected)"))
        fail(name, _("differs from -mean(log sigmoid(chosen - rejected)) (got {out:.6g}, expected {want:.6g})").format(out=float(out), want=float(want)))
    big_c, big_r = torch.tensor([-1000.0, 0.0], dtype=torch.float64), torch.tensor([1000.0, 0.0], dtype=torch.float64)
    out = torch.as_tensor(call(name, fn, big_c, big_r))
    if not bool(torch.isfinite(out).all()):
        fail(name, _("is not finite for a reward gap of -2000: log(sigmoid(x)) underflows to log(0); use "
                     "F.logsigmoid (or F.softplus(-x)), which compute it stably"))
    ok(_("bradley_terry_loss: -mean log sigmoid(chosen - rejected), stable for large gaps"))


# ----------------------------------------------------------------------------------------
# DPO


def check_dpo_loss(fn: Callable) -> None:
    """Check dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> (losses, chosen, rejected)."""
    from llmlab import align

    name = "dpo_loss"
    gen = torch.Generator().manual_seed(64)
    B, beta = 5, 0.3
    args = [randn(gen, B) * 4 - 20 for _ in range(4)]
    before = snapshot(args)
    out = call(name, fn, *args, beta)
    unchanged(name, before, args, _("a log-prob tensor"))
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        fail(name, _("return three tensors: (losses, chosen_rewards, rejected_rewards), as TRL's dpo_loss"))
    losses, chosen, rejected = (expect_tensor(name, t, (B,), torch.float64, _("{B} pairs").format(B=B),
                                              {(): _("the losses are per pair, shape (B,): the caller takes "
                                                     "the mean")})
                                for t in out)
    w_losses, w_chosen, w_rejected = align.dpo_loss(*args, beta)
    pc, pr, rc, rr = args
    if not (close(chosen, w_chosen, 1e-9) and close(rejected, w_rejected, 1e-9)):
        if close(chosen, w_rejected, 1e-9) and close(rejected, w_chosen, 1e-9):
            fail(name, _("the chosen and rejected rewards are swapped in the return value"))
        if close(chosen, pc - rc, 1e-9):
            fail(name, _("the implicit rewards lack beta: chosen_rewards = beta * (policy_chosen - ref_chosen)"))
        if close(chosen, beta * pc, 1e-9):
            fail(name, _("the implicit rewards ignore the reference: beta * (log pi - log pi_ref)"))
        if close(chosen, beta * (rc - pc), 1e-9):
            fail(name, _("the log-ratio is upside down: policy minus reference, not reference minus policy"))
        fail(name, _("chosen_rewards differ from beta * (policy_chosen - ref_chosen) (max |error| "
                     "{max_err:.2e})").format(max_err=max_err(chosen, w_chosen)))
    if close(losses, w_losses, 1e-9):
        ok(_("dpo_loss: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), implicit rewards beta * "
             "log-ratio"))
        return
    margin = (pc - rc) - (pr - rr)
    if close(losses, -F.logsigmoid(-beta * margin), 1e-9):
        fail(name, _("the losses favour the rejected response: the argument is chosen log-ratio minus rejected"))
    if close(losses, -F.logsigmoid(margin), 1e-9):
        fail(name, _("beta is missing inside the sigmoid: -log sigmoid(beta * (chosen - rejected log-ratios))"))
    if close(losses, -F.logsigmoid(beta * beta * margin), 1e-9):
        fail(name, _("beta is applied twice: the rewards already carry it"))
    if close(losses, F.logsigmoid(beta * margin), 1e-9):
        fail(name, _("the sign is missing: the loss is MINUS log sigmoid (it is >= 0)"))
    if close(losses, -F.logsigmoid(beta * (pc - pr)), 1e-9):
        fail(name, _("the loss ignores the reference: use the log-RATIOS policy - reference of both responses"))
    fail(name, _("losses differ from -log sigmoid(beta * margin) (max |error| {max_err:.2e})").format(max_err=max_err(losses, w_losses)))


# ----------------------------------------------------------------------------------------
# The verifier


def _quantity(name: str, out: Any, text: str) -> tuple[float, str] | None:
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[1], str):
        fail(name, _("returns {out!r} for {text!r}; expected (value, unit) or None").format(out=out, text=text))
    return as_float(name, out[0]), out[1]


def _check_parse_quantity(fn: Callable) -> None:
    from llmlab import evaluate

    name = "parse_quantity"
    for text in ("The answer is 180 km.", "She has 7 apples.", "It costs $12 in total.", "no number here",
                 "first 3 m, then 2 km", "1,250 cm", "That is 12 KM.", "0.5 hours", "50%"):
        got = _quantity(name, call(name, fn, text), text)
        want = evaluate.parse_quantity(text)
        if want is None or got is None:
            if (want is None) != (got is None):
                fail(name, _("returns {got!r} for {text!r}, expected ").format(got=got, text=text) + (_("None: there is no number") if want is None
                                                                          else f"({want.value!r}, {want.unit!r})"))
            continue
        if got[1] == want.unit and math.isclose(got[0], want.value, rel_tol=1e-9):
            continue
        case = _("for {text!r} returns {got!r}, expected ({value!r}, {unit!r})").format(text=text, got=got, value=want.value, unit=want.unit)
        if text.startswith("first"):
            fail(name, _("{case}: it takes the first number; the quantity of a text is its LAST one").format(case=case))
        if "," in text:
            fail(name, _("{case}: remove the thousands commas before converting the number").format(case=case))
        if "KM" in text:
            fail(name, _("{case}: lower-case the unit word before looking it up in UNITS").format(case=case))
        if "$" in text:
            fail(name, _("{case}: a '$' right before the number makes the unit '$'").format(case=case))
        if "apples" in text:
            fail(name, _("{case}: a word that is not in UNITS means no unit, ''").format(case=case))
        if got[1] != want.unit or not math.isclose(got[0], want.value, rel_tol=1e-9):
            fail(name, _("{case}: convert with UNITS: the value times the factor, the unit replaced by its "
                         "base unit").format(case=case))


def _check_verify(fn: Callable) -> None:
    name = "verify"
    for prediction, reference, want, why in (
            ("The answer is 180 km.", "180 km", True, _("the same quantity")),
            ("180000 m", "180 km", True, _("units are normalised: 180 km is 180000 m")),
            ("230 cm", "2.3 m", True, _("values compare within a relative 1e-6: 230 * 0.01 is "
                                        "2.3000000000000003")),
            ("180000", "180 km", False, _("the reference has a unit, the prediction none")),
            ("180 kg", "180 km", False, _("grams are not metres")),
            ("She has 7 apples.", "7", True, _("a reference without a unit accepts any word after the number")),
            ("It is 7 m long.", "7", True, _("a reference without a unit accepts any unit after the number")),
            ("181 km", "180 km", False, _("another number")),
            ("no idea", "7", False, _("a prediction without a number"))):
        got = call(name, fn, prediction, reference)
        if not isinstance(got, bool):
            fail(name, _("returns {type} for ({prediction!r}, {reference!r}); expected True or False").format(type=type(got).__name__, prediction=prediction, reference=reference))
        if got != want:
            fail(name, _("verify({prediction!r}, {reference!r}) is {got}, expected {want}: {why}").format(prediction=prediction, reference=reference, got=got, want=want, why=why))


def check_verify(parse_fn: Callable, verify_fn: Callable) -> None:
    """Check parse_quantity(text) and verify(prediction, reference)."""
    _check_parse_quantity(parse_fn)  # first: verify builds on it
    _check_verify(verify_fn)
    ok(_("parse_quantity and verify: the last quantity, units normalised, compared with a tolerance"))


# ----------------------------------------------------------------------------------------
# GRPO


def check_group_advantages(fn: Callable) -> None:
    """Check group_advantages(rewards, group_size)."""
    from llmlab import align

    name = "group_advantages"
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    G = 4
    before = rewards.clone()
    out = expect_tensor(name, call(name, fn, rewards, G), (12,), rewards.dtype, _("12 rewards in groups of 4"),
                        {(3, 4): _("flatten back to one advantage per completion, shape (N,)")})
    unchanged(name, before, rewards, "rewards")
    want = align.group_advantages(rewards, G)
    if close(out, want, 1e-9):
        ok(_("group_advantages: (r - group mean) / (group std + 1e-4), groups of consecutive completions"))
        return
    if not bool(torch.isfinite(out).all()):
        fail(name, _("gives NaN or inf for a group whose rewards are all equal (std 0): add 1e-4 to the std"))
    if close(out, (rewards - rewards.mean()) / (rewards.std() + 1e-4), 1e-9):
        fail(name, _("normalises over the whole batch; each prompt's completions are compared with their own "
                     "group"))
    g = rewards.view(-1, G)
    if close(out, ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + 1e-4)).reshape(-1), 1e-9):
        fail(name, _("uses the population std (unbiased=False); TRL uses torch's default, unbiased std"))
    strided = rewards.view(G, -1)
    if close(out, ((strided - strided.mean(0)) / (strided.std(0) + 1e-4)).reshape(-1), 1e-9):
        fail(name, _("groups the wrong completions: a prompt's group_size completions are consecutive, "
                     "rewards.view(-1, group_size)"))
    if close(out, (g - g.mean(1, keepdim=True)).reshape(-1), 1e-9):
        fail(name, _("only subtracts the group mean; divide by the group's std (+ 1e-4) too"))
    fail(name, _("differs from (r - group mean) / (group std + 1e-4) (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))


def check_grpo_loss(fn: Callable) -> None:
    """Check grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon, beta)."""
    from llmlab import align

    name = "grpo_loss"
    gen = torch.Generator().manual_seed(65)
    N, T, eps, beta = 5, 5, 0.2, 0.1
    logps = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 3
    old = logps + torch.tensor([-0.5, 0.5, 0.5, 0.05, -0.05], dtype=torch.float64)[:, None]  # ratios outside and inside the clip
    ref = logps + randn(gen, N, T) * 0.5
    adv = torch.tensor([1.0, -1.5, 0.8, 0.7, -0.3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    args = [logps, old, ref, adv, mask]
    before = snapshot(args)
    out = _scalar_tensor(name, call(name, fn, *args, eps, beta), torch.float64)
    unchanged(name, before, args, _("an input"))
    want = align.grpo_loss(*args, eps, beta)
    if close(out, want, 1e-9):
        ok(_("grpo_loss: clipped ratio objective minus beta * k3 KL, per completion's tokens, then over "
             "completions"))
        return

    def variant(ratio_fn=None, combine=torch.minimum, kl=None, reduce="per-seq", sign=-1.0, b=beta, m=mask):
        ratio = torch.exp(logps - old) if ratio_fn is None else ratio_fn()
        A = adv[:, None]
        obj = combine(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
        d = ref - logps
        k = torch.exp(d) - d - 1 if kl is None else kl
        per = sign * (obj - b * k)
        m = m.double()
        if reduce == "global":
            return (per * m).sum() / m.sum()
        return ((per * m).sum(1) / m.sum(1)).mean()

    for candidate, message in (
            (variant(combine=torch.maximum), _("takes the max of the two terms; the min makes the objective "
                                               "pessimistic (clipping may only remove incentive, never add it)")),
            (variant(combine=lambda a, b: a), _("the ratio is not clipped: min(ratio * A, clip(ratio, 1 - eps, "
                                                "1 + eps) * A)")),
            (variant(combine=lambda a, b: b), _("uses only the clipped term; take the min of the clipped and "
                                                "unclipped terms")),
            (variant(b=-beta), _("the KL penalty has the wrong sign: the objective is (clipped term) MINUS "
                                 "beta * KL")),
            (variant(kl=logps - ref), _("uses log pi - log pi_ref as the KL; use the k3 estimate exp(ref - "
                                        "logp) - (ref - logp) - 1")),
            (variant(reduce="global"), _("averages over all tokens of the batch; average each completion's own "
                                         "tokens, then over completions")),
            (variant(m=torch.ones_like(mask)), _("counts the padding: multiply by the mask and divide by each "
                                                 "row's mask sum")),
            (variant(sign=1.0), _("returns the objective; the loss is its negative (it is minimised)")),
            (variant(ratio_fn=lambda: logps - old), _("the ratio is exp(logps - old_logps), not the difference "
                                                      "itself"))):
        if close(out, candidate.reshape(()), 1e-9):
            fail(name, message)
    fail(name, _("differs from GRPO's loss (got {out:.6g}, expected {want:.6g})").format(out=float(out), want=float(want)))


# ----------------------------------------------------------------------------------------
# Evaluation


def check_choose(fn: Callable) -> None:
    """Check choose(logprobs, n_bytes) -> (acc_index, acc_norm_index)."""
    from llmlab import evaluate

    name = "choose"
    for lp, nb in (([-5.0, -4.0, -9.0, -30.0], [1, 3, 30, 4]), ([-4.0, -6.0, -9.0, -5.0], [4, 20, 4, 5]), ([-12.0, -3.0, -7.0], [30, 2, 10]),
                   ([-2.0, -2.0, -5.0], [3, 3, 9]), ([-9.0, -8.0, -8.5], [9, 4, 8])):
        out = call(name, fn, list(lp), list(nb))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail(name, _("returns {out!r}; expected a pair (acc_index, acc_norm_index)").format(out=out))
        got = tuple(int(v) for v in out)
        want = evaluate.mc_predict(lp, nb)
        if got == want:
            continue
        case = _("for logprobs {lp} and n_bytes {nb} returns {got}, expected {want}").format(lp=lp, nb=nb, got=got, want=want)
        argmin = min(range(len(lp)), key=lambda i: lp[i])
        if got[0] == argmin and want[0] != argmin:
            fail(name, _("{case}: the highest log-likelihood wins (log-probs are negative: -2 beats -9)").format(case=case))
        if got[0] == want[1] != want[0]:
            fail(name, _("{case}: acc uses the raw summed log-likelihood; only acc_norm divides by the bytes").format(case=case))
        if got[1] == max(range(len(lp)), key=lambda i: lp[i] * nb[i]) != want[0]:
            fail(name, _("{case}: acc_norm divides by the byte length, it does not multiply").format(case=case))
        if got[1] == want[0] != want[1]:
            fail(name, _("{case}: acc_norm divides each log-likelihood by its continuation's bytes").format(case=case))
        if lp[0] == lp[1]:
            fail(name, _("{case}: on ties take the first index, as argmax does").format(case=case))
        fail(name, case)
    ok(_("choose: acc by summed log-likelihood, acc_norm per byte, first index on ties"))


def _check_pass_at_k(fn: Callable) -> None:
    name = "pass_at_k"
    for n, c, k in ((10, 3, 1), (10, 3, 5), (20, 0, 4), (10, 8, 3), (50, 5, 10), (5, 5, 5)):
        got = as_float(name, call(name, fn, n, c, k))
        want = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            continue
        case = f"pass_at_k({n}, {c}, {k})"
        if math.isclose(got, 1 - (1 - c / n) ** k, rel_tol=1e-9):
            fail(name, _("{case}: 1 - (1 - c/n)^k is the biased plug-in estimate; use 1 - C(n-c, k) / C(n, k)").format(case=case))
        if math.isclose(got, c / n, rel_tol=1e-9):
            fail(name, _("{case}: c/n is pass@1 only; pass@k = 1 - C(n-c, k) / C(n, k)").format(case=case))
        if math.isclose(got, math.comb(c, k) / math.comb(n, k), rel_tol=1e-9, abs_tol=1e-12):
            fail(name, _("{case}: C(c, k) / C(n, k) is the chance that ALL k samples pass; pass@k needs at "
                         "least one").format(case=case))
        wrong_number(name, case, None, got, want)


def _check_wilson(fn: Callable) -> None:
    from llmlab import evaluate

    name = "wilson_interval"
    for s, n, z in ((6, 12, 1.96), (0, 10, 1.96), (9, 10, 2.576), (40, 100, 1.0)):
        out = call(name, fn, s, n, z)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail(name, _("returns {out!r}; expected a pair (lo, hi)").format(out=out))
        lo, hi = as_float(name, out[0]), as_float(name, out[1])
        want = evaluate.wilson_interval(s, n, z)
        if math.isclose(lo, want[0], abs_tol=1e-9) and math.isclose(hi, want[1], abs_tol=1e-9):
            continue
        case = _("wilson_interval({s}, {n}, {z}) gives ({lo:.6f}, {hi:.6f}), expected ({want:.6f}, {want2:.6f})").format(s=s, n=n, z=z, lo=lo, hi=hi, want=want[0], want2=want[1])
        p = s / n
        wald = z * math.sqrt(p * (1 - p) / n)
        if math.isclose(lo, max(0.0, p - wald), abs_tol=1e-9) and math.isclose(hi, min(1.0, p + wald), abs_tol=1e-9) \
                or (math.isclose(lo, p - wald, abs_tol=1e-9) and math.isclose(hi, p + wald, abs_tol=1e-9)):
            fail(name, _("{case}: that is the textbook (Wald) interval p +- z sqrt(p(1-p)/n); Wilson's centre "
                         "and width carry z^2 terms").format(case=case))
        if math.isclose(hi, want[0], abs_tol=1e-9) and math.isclose(lo, want[1], abs_tol=1e-9):
            fail(name, _("{case}: return (lo, hi), the lower bound first").format(case=case))
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        if math.isclose(lo, max(0.0, p - half), abs_tol=1e-9) and math.isclose(hi, min(1.0, p + half), abs_tol=1e-9):
            fail(name, _("{case}: the centre is (p + z^2 / 2n) / (1 + z^2 / n), not p: Wilson pulls it toward "
                         "1/2").format(case=case))
        fail(name, _("{case}: check the z^2 terms (z * z, not z)").format(case=case))


def check_eval_stats(pass_fn: Callable, wilson_fn: Callable) -> None:
    """Check pass_at_k(n, c, k) and wilson_interval(successes, n, z)."""
    _check_pass_at_k(pass_fn)
    _check_wilson(wilson_fn)
    ok(_("pass_at_k: the unbiased estimator; wilson_interval: the score interval, sound at 0/n and n/n"))
