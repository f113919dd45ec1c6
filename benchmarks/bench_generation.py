"""Batched generation (lmtune.generation) vs transformers' ``model.generate`` one prompt at a time.

Both sides continue the same 32 chat prompts (SmolLM2's chat template, its default system turn) written for
this benchmark: short questions, instructions, and "Summarize:" / "Rewrite:" tasks over passages of 50 to
75 words, so prompts run from 36 to 143 tokens (the chat template's system turn included). Greedy decoding, ``max_new_tokens`` 64, the
same end tokens (``lmtune.generation.end_ids``: ``<|im_end|>``), float32 on the CPU, the default model.

Sides, each timed over the whole prompt set:

* ``peer``: ``model.generate(do_sample=False)`` on one prompt at a time (no padding);
* ``lmtune``: ``lmtune.generation.generate`` with ``batch_size`` 16 and the default schedule (``refill``);
* with ``--schedules``, lmtune's other schedules (``drop``: finished rows leave, the batch shrinks;
  ``mask``: finished rows stay until the batch is done) and ``hf-batched``: ``model.generate`` on
  left-padded batches of 16 (what a user of transformers would write), to show which choice is faster here.

The machine is shared with other jobs, so the sides run in alternating rounds, the order reversed every
round (A B, B A, ...), and throughput is the total generated tokens over the total time of each side. The
outputs of every side are compared token for token with the peer's; where a row differs, the logit gap
between the two candidate tokens at the first differing position (from the peer's own unpadded forward
pass) says whether it is a near-tie of float rounding.

Goal: lmtune >= 3x the peer's generated tokens per second, with identical greedy outputs (rows that differ
only at a near-tie of float rounding, a logit gap below 1e-4, are reported and do not count against it).

Usage: .venv/bin/python benchmarks/bench_generation.py [--quick] [--rounds N] [--schedules refill,drop,mask,hf-batched]
       [--out benchmarks/results/generation.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_wait_idle, emit, loadavg, log, save, start  # noqa: E402

MODEL = "smollm2-135m"
GOAL_SPEEDUP = 3.0
NEAR_TIE = 1e-4

PASSAGES = [
    "The city council met on Thursday to discuss the new bicycle lanes on Main Street. Shop owners worried that "
    "removing parking spaces would hurt business, while cyclists said the lanes would make the street safer. "
    "After two hours of debate, the council voted to try the lanes for six months and count visitors to the shops.",
    "Photosynthesis is the process plants use to turn light into chemical energy. Inside the leaves, chlorophyll "
    "absorbs sunlight, and the plant combines carbon dioxide from the air with water from the soil to make "
    "glucose. Oxygen is released as a by-product, which is why forests are important for the air we breathe.",
    "Maria started her bakery with one oven and a handful of recipes from her grandmother. For the first year she "
    "worked alone, waking at four every morning to bake bread before the shop opened. Word spread about her rye "
    "loaves, and by the third year she had hired four people and opened a second shop across town. She still "
    "bakes the rye herself every Saturday.",
    "The museum's new exhibition brings together two hundred maps drawn between 1500 and 1800. Visitors can see "
    "how sailors imagined coastlines they had never reached, with sea monsters filling the empty spaces. The "
    "curators placed early and late maps of the same regions side by side, so the growth of knowledge is easy to "
    "follow. The exhibition runs until March and entry is free on the first Sunday of each month.",
    "Our team moved the weekly planning meeting from Monday morning to Tuesday afternoon because too many people "
    "were travelling on Mondays. The agenda stays the same: a short review of last week, the priorities for the "
    "coming week, and any blockers. Please add your items to the shared document by Tuesday noon.",
    "Researchers followed 3,000 adults for ten years to study how sleep affects memory. Those who slept between "
    "seven and eight hours a night scored best on memory tests at the end of the study. People who slept less "
    "than six hours, and surprisingly those who slept more than nine, scored lower. The authors caution that the "
    "study shows a link, not a cause, and that other habits may explain part of the difference.",
    "The hiking trail climbs 600 meters over five kilometers through pine forest before reaching a small lake. "
    "The path is well marked but rocky near the top, so good shoes are needed. In summer the lake is warm enough "
    "for a swim, and there is a hut that sells drinks and sandwiches from June to September.",
    "Electric cars are becoming cheaper as battery prices fall. A battery pack that cost more than 1,000 dollars "
    "per kilowatt-hour in 2010 costs less than 150 today. Charging stations are still rare in the countryside, "
    "which makes long trips harder to plan, but many countries are building fast chargers along their highways. "
    "Analysts expect electric cars to cost the same as petrol cars within a few years.",
]

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Name two planets larger than Earth.",
    "How do I boil an egg?",
    "Write a haiku about the sea.",
    "Explain what a noun is to a child.",
    "Suggest a name for a friendly robot.",
    "What are the primary colors?",
    "Translate to French: Good morning, how are you?",
    "Write one sentence about autumn.",
    "List four fruits that are red.",
    "What does a thermometer measure?",
    "Give a synonym for happy.",
    "How many days are there in a leap year?",
]


def build_prompts(tok) -> list[list[int]]:
    """32 chat prompts: 16 questions, 8 summaries and 8 rewrites of the passages."""
    users = list(QUESTIONS)
    users += [f"Summarize in one sentence:\n\n{p}" for p in PASSAGES]
    users += [f"Rewrite the following text for a ten-year-old reader, in at most three sentences:\n\n{p}"
              for p in PASSAGES]
    return [list(tok.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]) for u in users]


# -- the sides ------------------------------------------------------------------------------------------

def run_peer(lm, prompts, max_new, eos) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            seq = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new, eos_token_id=list(eos),
                                    pad_token_id=lm.tokenizer.pad_token_id)
            out.append(seq[0, len(p):].tolist())
    return out


def run_hf_batched(lm, prompts, max_new, eos, batch_size) -> list[list[int]]:
    """``model.generate`` on left-padded batches (prompts sorted by length, as lmtune does)."""
    import torch

    pad = lm.tokenizer.pad_token_id
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            T = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, T - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, T - len(prompts[i]):] = 1
            seq = lm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                    eos_token_id=list(eos), pad_token_id=pad)
            for r, i in enumerate(idx):
                new = seq[r, T:].tolist()
                cut = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))  # then padding
                out[i] = new[:cut]
    return out  # type: ignore[return-value]


def run_lmtune(lm, prompts, max_new, eos, batch_size, schedule) -> list[list[int]]:
    from lmtune.generation import generate

    res = generate(lm, prompts, max_new_tokens=max_new, eos_token_ids=eos, batch_size=batch_size, schedule=schedule)
    return [g.token_ids for g in res]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def logit_gap(lm, prompt, prefix, x, y) -> float:
    """|logit(x) - logit(y)| after ``prompt + prefix``, from one unpadded forward pass."""
    import torch

    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + prefix]), logits_to_keep=1).logits[0, -1].float()
    return float((logits[x] - logits[y]).abs())


def compare(lm, prompts, peer, other, eos) -> dict:
    rows = []
    for i, (a, b) in enumerate(zip(peer, other)):
        k = first_difference(a, b)
        if k is None:
            continue
        row = {"index": i, "first_difference": k, "peer_tokens": len(a), "tokens": len(b)}
        if k < len(a) and k < len(b):
            row["logit_gap"] = logit_gap(lm, prompts[i], a[:k], a[k], b[k])
        rows.append(row)
    near = [r for r in rows if r.get("logit_gap") is not None and r["logit_gap"] < NEAR_TIE]
    return {"identical": len(prompts) - len(rows), "of": len(prompts), "differing": rows,
            "differing_not_near_tie": len(rows) - len(near)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 prompts, 16 new tokens, 1 round")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2, quick 1)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--schedules", default="refill",
                    help="lmtune schedules to time (refill, drop, mask) and hf-batched, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    add_wait_idle(ap)
    args = ap.parse_args()

    import torch

    import lmtune
    from lmtune.generation import end_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    env = start(args)
    lm = lmtune.load_model(MODEL, device="cpu")
    prompts = build_prompts(lm.tokenizer)
    max_new = args.max_new_tokens
    rounds = args.rounds or (1 if args.quick else 2)
    if args.quick:
        prompts, max_new = prompts[::4], 16
    eos = end_ids(lm)
    sides = {"peer": lambda: run_peer(lm, prompts, max_new, eos)}
    for s in [s.strip() for s in args.schedules.split(",") if s.strip()]:
        if s == "hf-batched":
            sides[s] = lambda: run_hf_batched(lm, prompts, max_new, eos, args.batch_size)
        else:
            sides[f"lmtune-{s}"] = lambda s=s: run_lmtune(lm, prompts, max_new, eos, args.batch_size, s)
    log(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"max_new_tokens {max_new}, sides {list(sides)}, {rounds} rounds, {torch.get_num_threads()} threads")
    run_lmtune(lm, prompts[:2], 2, eos, 2, "refill")  # warm-up: first-call costs out of the timings
    run_peer(lm, prompts[:1], 2, eos)

    times = {k: [] for k in sides}
    outputs: dict[str, list[list[int]]] = {}
    load = {k: [] for k in sides}
    for r in range(rounds):
        names = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in names:
            t0 = time.perf_counter()
            outs = sides[name]()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            load[name].append(loadavg()[0] if loadavg() else None)
            n = sum(map(len, outs))
            log(f"round {r + 1} {name}: {n} tokens in {dt:.1f} s = {n / dt:.2f} tokens/s (load {loadavg()})")
            if name in outputs and outputs[name] != outs:
                log(f"  {name}: output changed between rounds")
            outputs[name] = outs

    peer = outputs["peer"]
    result = {"benchmark": "generation", "model": MODEL, "n_prompts": len(prompts),
              "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                                "mean": sum(map(len, prompts)) / len(prompts)},
              "max_new_tokens": max_new, "batch_size": args.batch_size, "rounds": rounds, "quick": args.quick,
              "eos_token_ids": list(eos), "sides": {}}
    for name in sides:
        tokens = sum(map(len, outputs[name]))
        total = sum(times[name])
        side = {"new_tokens_per_round": tokens, "seconds": times[name], "tokens_per_s": tokens * rounds / total,
                "loadavg_1min_after": load[name],
                "finish_eos": sum(1 for o in outputs[name] if o and o[-1] in eos)}
        if name != "peer":
            side["speedup_vs_peer"] = side["tokens_per_s"] / (sum(map(len, peer)) * rounds / sum(times["peer"]))
            side["outputs_vs_peer"] = compare(lm, prompts, peer, outputs[name], eos)
        result["sides"][name] = side
    main_side = result["sides"]["lmtune-refill"] if "lmtune-refill" in result["sides"] else None
    result["goal"] = (f"lmtune (refill, batch {args.batch_size}) >= {GOAL_SPEEDUP:g}x the peer's generated tokens/s, "
                      f"greedy outputs identical except near-ties (logit gap < {NEAR_TIE:g})")
    result["met"] = bool(main_side and main_side["speedup_vs_peer"] >= GOAL_SPEEDUP
                         and main_side["outputs_vs_peer"]["differing_not_near_tie"] == 0)
    result["environment"] = env
    emit(result)
    if not args.quick:
        save(result, args.out)


if __name__ == "__main__":
    main()
