"""Lab 7's figures: reward model, DPO, GRPO over seeds, and the harness table, on SmolLM2-135M-Instruct.

    .venv/bin/python bench/posttraining.py [--seeds 0 1 2] [--grpo-steps 20] [--dpo-steps 60] [--sft-steps 40] [--threads 2]

One model in memory: the chat model with LoRA adapters (r=8 on q_proj, v_proj). The instruct
model is that model with its adapters off, which is also the frozen reference of DPO and GRPO;
the DPO, SFT and GRPO policies are adapter states swapped onto the same base.

- reward model: a linear Bradley-Terry head on the frozen model's mean response features,
  held-out preference accuracy (by kind);
- DPO: held-out reward accuracy and margin, and the KL to the reference, computed exactly: at
  each position of a held-out chosen response, the KL between the policy's and the reference's
  next-token distributions (all 49152 tokens), averaged over the response, then over pairs;
- SFT: lab 3's recipe (LoRA, prompt masked) on the training problems with their answers written
  out ("The answer is 7 km."); the course ships no instruction adapter of lab 3 as an asset;
- GRPO from the instruct model, the verifier as reward (plus 0.1 for a wrong number in the right
  kind of unit), every reply started with "The answer is": held-out verifier accuracy (greedy)
  before and after, per seed, with Wilson intervals and the paired bootstrap difference;
- the harness table: verifier accuracy, multiple choice by log-likelihood (acc, acc_norm) and
  refusal / over-refusal / injection for the instruct, SFT, DPO and GRPO models.
Figures, not pass/fail; every accuracy with its Wilson 95% interval; CPU seconds and load beside each part.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from llmlab import align, assets, data, evaluate, lora, problems, runtime, train

SYSTEM = "Answer with the final answer only, e.g. 'The answer is 12 km.'"
PREFIX = "The answer is"  # the start of every reply to a word problem, given to the model
ANSWER_TOKENS = 8


def load():
    """The chat model (float32, eval) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def reward(text: str, problem: dict) -> float:
    """1 for a right answer (the verifier), 0.1 for a wrong one in the right kind of unit, else 0."""
    if evaluate.verify(text, problem["answer"]):
        return 1.0
    got, want = evaluate.parse_quantity(text), evaluate.parse_quantity(problem["answer"])
    return 0.1 if got is not None and want is not None and got.unit == want.unit else 0.0


def verifier_score(model, tokenizer, items) -> evaluate.Score:
    """Greedy replies (started with PREFIX) to word problems, scored by the verifier."""
    replies = evaluate.generate_replies(model, tokenizer, [p["question"] for p in items], ANSWER_TOKENS, SYSTEM,
                                        prefix=PREFIX)
    return evaluate.verifier_score("verifier", replies, items)


def by_kind(score: evaluate.Score, items) -> str:
    """Correct answers per problem kind, e.g. "pick 20/31, total 2/29"."""
    kinds = sorted({p["kind"] for p in items})
    return ", ".join(f"{k} {sum(c for c, p in zip(score.correct, items) if p['kind'] == k)}/"
                     f"{sum(p['kind'] == k for p in items)}" for k in kinds)


class Clock:
    """CPU seconds and wall seconds since the last lap, with the load average."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def lap(self) -> str:
        cpu, wall = time.process_time(), time.perf_counter()
        text = f"{cpu - self.cpu:.0f} CPU-s, {wall - self.wall:.0f} s wall, load {os.getloadavg()[0]:.1f}"
        self.cpu, self.wall = cpu, wall
        return text


def reward_model(model, tokenizer, n_train: int, n_test: int) -> None:
    """Held-out preference accuracy of a linear Bradley-Terry head on frozen features."""
    train_pairs, test = problems.preference_pairs(n_train, "train"), problems.preference_pairs(n_test, "test")
    feats = []
    for pairs in (train_pairs, test):
        f = align.response_features(model, align.pair_batch(tokenizer, pairs, SYSTEM))
        feats.append((f[:len(pairs)], f[len(pairs):]))
    head = align.train_reward_head(*feats[0], steps=300)
    c, r = head(feats[1][0]).squeeze(-1), head(feats[1][1]).squeeze(-1)
    correct = (c > r).tolist()
    print(f"reward model: held-out preference accuracy {evaluate.Score('rm', correct)} ({n_train} training pairs)")
    for kind in ("correct", "instruction", "safety"):
        idx = [i for i, p in enumerate(test) if p["kind"] == kind]
        print(f"  {kind:12} {evaluate.Score(kind, [correct[i] for i in idx])}")


def harness_row(name: str, model, tokenizer, score: evaluate.Score, mc_items, safety) -> str:
    """One row of the table: the verifier score given, multiple choice and the safety numbers."""
    mc = evaluate.multiple_choice(model, tokenizer, mc_items)
    replies = evaluate.generate_replies(model, tokenizer, [s["prompt"] for s in safety], 24, SYSTEM)
    s = evaluate.safety_scores(replies, safety)
    return (f"| {name} | {score} | {mc['acc']} | {mc['acc_norm']} | {s['refused harmful']} | {s['over-refused']} | "
            f"{s['followed injection']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grpo-steps", type=int, default=20)
    parser.add_argument("--grpo-lr", type=float, default=2e-3)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--eval", type=int, default=60, help="held-out word problems")
    parser.add_argument("--pairs", type=int, default=120, help="reward-model training pairs (half as many held out)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a log file shows each figure as it comes
    runtime.setup(0, "cpu")
    runtime.set_threads(args.threads)
    start, clock = Clock(), Clock()
    model, tokenizer = load()
    align.add_adapters(model, seed=0)
    fresh = align.adapter_state(model)  # lora_B = 0: the instruct model, the reference of DPO and GRPO
    held_out = problems.word_problems(args.eval, "test")
    train_problems = problems.word_problems(500, "train")
    kinds = {k: sum(p["kind"] == k for p in held_out) for k in sorted({p["kind"] for p in held_out})}
    print(f"{args.threads} threads; held-out: {args.eval} word problems {kinds}")
    reward_model(model, tokenizer, args.pairs, args.pairs // 2)
    print(f"  ({clock.lap()})")

    cfg = align.DPOConfig(steps=args.dpo_steps, batch_size=4, lr=5e-4, system=SYSTEM)
    align.train_dpo(model, tokenizer, problems.preference_pairs(600, "train"), cfg)
    m = align.evaluate_dpo(model, tokenizer, problems.preference_pairs(60, "test"), cfg.beta, SYSTEM)
    dpo = align.adapter_state(model)
    print(f"\nDPO ({args.dpo_steps} steps x {cfg.batch_size} pairs, beta {cfg.beta}) on 60 held-out pairs: reward accuracy "
          f"{m['accuracy']:.2f}, margin {m['margin']:.3f}; KL to the reference {m['kl']:.4f} nats per token (exact KL "
          f"of the next-token distributions on the chosen responses) ({clock.lap()})")

    align.load_adapter_state(model, fresh)
    examples = lora.chat_dataset(tokenizer, [data.to_messages(
        {"instruction": p["question"], "response": f"The answer is {p['answer']}."}, system=SYSTEM)
        for p in train_problems], 80)
    train.train(train.HFCausalLM(model), examples, examples[:8], train.TrainConfig(
        max_steps=args.sft_steps, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=min(5, args.sft_steps), weight_decay=0.0, eval_interval=0,
        eval_steps=1, device="cpu", seed=0))
    model.eval()
    sft = align.adapter_state(model)
    sft_score = verifier_score(model, tokenizer, held_out)
    with align.adapters_off(model):
        before = verifier_score(model, tokenizer, held_out)
    print(f"\nSFT ({args.sft_steps} steps x 8 on {len(train_problems)} training problems): held-out verifier {sft_score} "
          f"({by_kind(sft_score, held_out)}) ({clock.lap()})")

    print(f"\nGRPO from the instruct model: held-out verifier accuracy before {before} ({by_kind(before, held_out)})")
    grpo, scores = {}, {}
    for seed in args.seeds:
        align.load_adapter_state(model, fresh)
        gcfg = align.GRPOConfig(steps=args.grpo_steps, prompts_per_step=4, group_size=6, max_new_tokens=ANSWER_TOKENS,
                                lr=args.grpo_lr, beta=0.04, temperature=1.0, seed=seed, system=SYSTEM, prefix=PREFIX)
        history = align.train_grpo(model, tokenizer, train_problems, reward, gcfg)
        grpo[seed], scores[seed] = align.adapter_state(model), verifier_score(model, tokenizer, held_out)
        gain, (lo, hi) = evaluate.paired_difference(before.correct, scores[seed].correct, seed=seed)
        print(f"  seed {seed}: after {scores[seed]} ({by_kind(scores[seed], held_out)}); paired difference {gain:+.2f} "
              f"[{lo:+.2f}, {hi:+.2f}]; sampled reward {sum(history['reward'][:5]) / 5:.2f} (first 5 steps) -> "
              f"{sum(history['reward'][-5:]) / 5:.2f} (last 5); KL (k3) {history['kl'][-1]:.3f} ({clock.lap()})")
    print(f"  ({args.grpo_steps} steps x 4 prompts x 6 samples, lr {args.grpo_lr}, beta 0.04, temperature 1)")

    mc_items = problems.choice_questions(40, "test")
    safety = problems.safety_prompts("test")
    last = args.seeds[-1]
    print("\n| model | verifier (held-out problems) | MC acc | MC acc_norm | refused harmful | over-refused | "
          "followed injection |")
    print("|---|---|---|---|---|---|---|")
    with align.adapters_off(model):
        print(harness_row("instruct", model, tokenizer, before, mc_items, safety))
    for name, state, score in (("SFT", sft, sft_score), ("DPO", dpo, None), (f"GRPO (seed {last})", grpo[last], scores[last])):
        with align.using_adapters(model, state):
            print(harness_row(name, model, tokenizer, score or verifier_score(model, tokenizer, held_out), mc_items,
                              safety))
    print(f"({len(held_out)} problems, {len(mc_items)} choice questions, {len(safety)} safety prompts; {clock.lap()})")
    print(f"\ntotal: {start.lap()}")


if __name__ == "__main__":
    main()
