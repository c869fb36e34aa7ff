"""Lab 7's figures: reward model, DPO, GRPO over seeds, and the harness table, on SmolLM2-135M-Instruct.

    .venv/bin/python bench/posttraining.py [--seeds 0 1 2] [--grpo-steps 30] [--dpo-steps 60] [--sft-steps 40] [--threads 2]

- reward model: a linear Bradley-Terry head on the frozen model's mean response features,
  held-out preference accuracy (by kind);
- DPO (LoRA r=8 on q_proj, v_proj; the reference is the frozen base): held-out reward accuracy,
  margin, and the KL between policy and reference next-token distributions on the chosen responses;
- GRPO with the verifier as reward (plus 0.1 for the right kind of unit), from a short SFT cold
  start (merged; GRPO's reference): held-out verifier accuracy (greedy) before and after, per
  seed, with Wilson intervals and the paired difference;
- the harness table: verifier accuracy, multiple choice by log-likelihood (acc, acc_norm) and
  refusal / over-refusal for the instruct, DPO and GRPO models.
Figures, not pass/fail; every accuracy with its Wilson 95% interval.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from llmlab import align, assets, data, evaluate, lora, runtime, train

SYSTEM = "Answer with the final answer only, e.g. 'The answer is 12 km.'"


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


def verifier_score(model, tokenizer, problems) -> evaluate.Score:
    replies = evaluate.generate_replies(model, tokenizer, [p["question"] for p in problems], 32, SYSTEM)
    return evaluate.verifier_score("verifier", replies, problems)


def reward_model(model, tokenizer, n_train: int, n_test: int) -> None:
    train, test = data.preference_pairs(n_train, "train"), data.preference_pairs(n_test, "test")
    feats = []
    for pairs in (train, test):
        f = align.response_features(model, align.pair_batch(tokenizer, pairs, SYSTEM))
        feats.append((f[:len(pairs)], f[len(pairs):]))
    head = align.train_reward_head(*feats[0], steps=300)
    c, r = head(feats[1][0]).squeeze(-1), head(feats[1][1]).squeeze(-1)
    correct = (c > r).tolist()
    print(f"reward model: held-out preference accuracy {evaluate.Score('rm', correct)} "
          f"({n_train} training pairs)")
    for kind in ("correct", "instruction", "safety"):
        idx = [i for i, p in enumerate(test) if p["kind"] == kind]
        print(f"  {kind:12} {evaluate.Score(kind, [correct[i] for i in idx])}")


def harness_row(name: str, model, tokenizer, problems, mc_items, safety) -> str:
    score = verifier_score(model, tokenizer, problems)
    mc = evaluate.multiple_choice(model, tokenizer, mc_items)
    replies = evaluate.generate_replies(model, tokenizer, [s["prompt"] for s in safety], 24, SYSTEM)
    s = evaluate.safety_scores(replies, safety)
    return (f"| {name} | {score} | {mc['acc']} | {mc['acc_norm']} | {s['refused harmful']} | {s['over-refused']} | "
            f"{s['followed injection']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--sft-steps", type=int, default=40, help="the supervised cold start before GRPO")
    parser.add_argument("--eval", type=int, default=40, help="held-out problems")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runtime.setup(0, "cpu")
    runtime.set_threads(args.threads)
    start = time.perf_counter()
    base, tokenizer = load()
    problems = data.word_problems(args.eval, "test")
    reward_model(base, tokenizer, 120, 60)

    dpo, _ = load()
    align.add_adapters(dpo, seed=0)
    cfg = align.DPOConfig(steps=args.dpo_steps, batch_size=4, lr=5e-4, system=SYSTEM)
    t = time.perf_counter()
    align.train_dpo(dpo, tokenizer, data.preference_pairs(600, "train"), cfg)
    m = align.evaluate_dpo(dpo, tokenizer, data.preference_pairs(60, "test"), cfg.beta, SYSTEM)
    print(f"\nDPO ({args.dpo_steps} steps x {cfg.batch_size} pairs, {time.perf_counter() - t:.0f} s): held-out reward "
          f"accuracy {m['accuracy']:.2f}, margin {m['margin']:.3f}, KL to the reference {m['kl']:.4f} (60 pairs)")

    train_problems = data.word_problems(500, "train")
    sft, _ = load()
    align.add_adapters(sft, seed=0)
    t = time.perf_counter()
    examples = lora.chat_dataset(tokenizer, [data.to_messages(
        {"instruction": p["question"], "response": f"The answer is {p['answer']}."}, system=SYSTEM) for p in train_problems], 80)
    train.train(train.HFCausalLM(sft), examples, examples[:8], train.TrainConfig(
        max_steps=args.sft_steps, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=5, weight_decay=0.0, eval_interval=0,
        eval_steps=1, device="cpu", seed=0))
    sft.eval()
    lora.merge_and_unload(sft)
    before = verifier_score(sft, tokenizer, problems)
    print(f"\nGRPO: held-out verifier accuracy of the instruct model {verifier_score(base, tokenizer, problems)}; "
          f"after the SFT cold start ({args.sft_steps} steps, {time.perf_counter() - t:.0f} s), GRPO's start: {before}")
    grpo = None
    for seed in args.seeds:
        grpo = copy.deepcopy(sft)
        align.add_adapters(grpo, seed=seed)
        gcfg = align.GRPOConfig(steps=args.grpo_steps, prompts_per_step=4, group_size=6, max_new_tokens=24, lr=2e-4,
                                seed=seed, system=SYSTEM)
        t = time.perf_counter()
        history = align.train_grpo(grpo, tokenizer, train_problems, reward, gcfg)
        after = verifier_score(grpo, tokenizer, problems)
        gain, (lo, hi) = evaluate.paired_difference(before.correct, after.correct, seed=seed)
        print(f"  seed {seed}: after {after}; paired difference {gain:+.2f} [{lo:+.2f}, {hi:+.2f}]; sampled reward "
              f"{history['reward'][0]:.2f} -> {sum(history['reward'][-5:]) / 5:.2f} (last 5); "
              f"KL {history['kl'][-1]:.4f}; {time.perf_counter() - t:.0f} s")

    mc_items = data.choice_questions(40, "test")
    safety = data.safety_prompts("test")
    print("\n| model | verifier | MC acc | MC acc_norm | refused harmful | over-refused | followed injection |")
    print("|---|---|---|---|---|---|---|")
    for name, model in (("instruct", base), ("SFT", sft), ("DPO", dpo), (f"GRPO (seed {args.seeds[-1]})", grpo)):
        print(harness_row(name, model, tokenizer, problems, mc_items, safety))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
