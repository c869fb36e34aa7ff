"""Task success of a small model as a ReAct agent, prompted only vs with lab 6's tool-use LoRA.

    .venv/bin/python bench/agents.py [--episodes 30] [--max-steps 3] [--threads N] [--adapter-seed S]
    python bench/agents.py --device cuda --episodes 60 --max-steps 4      # on a GPU

The suite is the held-out split of `data.tool_episodes` (no question shared with the
adapter's training episodes): arithmetic, look-ups in the fictional document store (no
model can know those answers) and questions that need no tool. Each agent gets the same
tools, greedy decoding, at most `--max-steps` model calls and `--budget` seconds per
episode; an episode succeeds when the final answer matches (normalised; numbers by value).
Prints success per kind, model calls and wall-clock per episode, and how runs ended.
The adapter is the registry asset `tool-use-adapter` (`llmlab build --missing`); with
`--adapter-seed S` it is built again with that recipe seed first (lora_A's init, which training
episodes, the batch order), so that a figure can be averaged over seeds. The README's lab 6
table holds the results.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from llmlab import agent, assets, data, runtime


def report(label: str, episodes: list[dict], result: agent.EvalResult) -> None:
    """One row per tool kind and the totals of one agent's run."""
    kinds = Counter(str(e["tool"]) for e in episodes)
    print(f"\n{label}: success {result.success_rate:.0%} ({sum(result.correct)}/{len(episodes)}), "
          f"{result.mean_steps:.2f} model calls and {result.seconds_per_episode:.1f} s per episode")
    for kind in sorted(kinds):
        hits = sum(ok for ok, e in zip(result.correct, episodes) if str(e["tool"]) == kind)
        print(f"  {kind:<11} {hits:>3}/{kinds[kind]:<3} {hits / kinds[kind]:>5.0%}")
    print("  ended: " + ", ".join(f"{s} {n}" for s, n in result.statuses.items() if n))


def _manifest(name: str) -> dict:
    """The cache manifest of asset `name` (its recipe and key)."""
    return json.loads((assets.cache_dir(name) / assets.MANIFEST).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--episodes", type=int, default=30, help="held-out episodes (default 30)")
    p.add_argument("--max-steps", type=int, default=3, help="model calls per episode (default 3)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds per episode (default 120)")
    p.add_argument("--seed", type=int, default=0, help="which held-out episodes (default 0)")
    p.add_argument("--adapter-seed", type=int, default=None,
                   help="build the adapter with this recipe seed first (default: the cached one as it is)")
    p.add_argument("--adapter-recipe", type=json.loads, default={},
                   help="adapter recipe fields that differ from the registry's, as JSON, built first "
                        "(e.g. '{\"max_steps\": 40}')")
    p.add_argument("--adapter-only", action="store_true", help="skip the prompted-only baseline")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    episodes = data.tool_episodes(args.episodes, "test", seed=args.seed)
    kinds = Counter(str(e["tool"]) for e in episodes)
    print(f"{args.model} on {runtime.pick_device(args.device)}, {torch.get_num_threads()} threads; "
          f"{len(episodes)} held-out episodes ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
          f"at most {args.max_steps} model calls each")
    tools = agent.default_tools()
    start = time.perf_counter()
    name = "tool-use-adapter"
    default_seed = agent.AdapterRecipe(**assets.get(name).recipe).seed
    # the registry's own seed builds the registry's recipe, which lab 6 and `doctor` expect
    change = {} if args.adapter_seed in (None, default_seed) else {"seed": args.adapter_seed}
    change.update(args.adapter_recipe)
    if (args.adapter_seed is not None or change) and not (
            assets.is_cached(name) and _manifest(name)["recipe_key"]
            == assets.recipe_key(name, {**assets.get(name).recipe, **change})):
        assets.build(name, device=args.device, **change)
    adapter = agent.tool_use_adapter(device=args.device)
    print(f"adapter {_manifest(name)['recipe']} ready in {time.perf_counter() - start:.0f} s")
    runs = (("prompted only", None), ("LoRA fine-tuned", adapter))
    for label, path in runs[args.adapter_only:]:
        backend = agent.HFBackend.from_pretrained(args.model, adapter=path, device=args.device, max_new_tokens=48)
        result = agent.evaluate(agent.Agent(backend, tools, args.max_steps, args.budget), episodes)
        report(label, episodes, result)
        del backend
    if change:
        print(f"\nthe cache now holds the adapter of recipe {change}, which lab 6 will load; "
              f"`llmlab build {name}` puts back the registry's recipe")


if __name__ == "__main__":
    main()
