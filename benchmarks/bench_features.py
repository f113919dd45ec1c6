"""Feature-extraction throughput: lmtune.features.extract vs a plain transformers forward pass.

Same prompts for every path: the built-in reviews test split (200 records) formatted with the demo
task (``lmtune.demo.demo_task()``, chat template on), tokenized once by the task.

* ``lmtune``: ``lmtune.features.extract(lm, ids, label_ids, batch_size=16)``: the dataset's common token
  prefix is run once and its key/value cache broadcast; length-sorted batches with right padding; the
  backbone only, then the K label columns of the output embedding at each last real token.
* ``lmtune_no_prefix``: the same with ``share_prefix=False`` (length sorting only), to show what each
  trick contributes.
* ``peer``: what a user writes with plain transformers: batches of 16 in the dataset's order, padded by
  the tokenizer to the longest prompt of each batch on the *left* (so position -1 is every row's last
  token), with the attention mask, and ``model(**batch).logits[:, -1, label_ids]``: a full forward pass
  with full-vocabulary logits at every position.

The label logits of the peer and of lmtune must agree (max abs difference reported; ~1e-3 expected
from float32 summation order and padding).

Goal: lmtune >= 1.5x the peer's prompts/s.

Usage: .venv/bin/python benchmarks/bench_features.py [--quick] [--repeats N] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_wait_idle, emit, log, median, start  # noqa: E402

GOAL_RATIO = 1.5
AGREE_TOL = 1e-3


def peer_extract(lm, input_ids, label_ids, batch_size):
    """Plain transformers: tokenizer left padding per batch (dataset order), full forward, last position."""
    import numpy as np
    import torch

    tok, model = lm.tokenizer, lm.model
    out = np.empty((len(input_ids), len(label_ids)), dtype=np.float32)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with torch.inference_mode():
            for s in range(0, len(input_ids), batch_size):
                batch = tok.pad({"input_ids": input_ids[s:s + batch_size]}, padding=True, return_tensors="pt")
                logits = model(**batch).logits[:, -1, label_ids]
                out[s:s + batch_size] = logits.float().numpy()
    finally:
        tok.padding_side = side
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run on 48 prompts, one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per path (default 3, quick 1)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n", type=int, default=None, help="number of test prompts (default all 200, quick 48)")
    add_wait_idle(ap)
    args = ap.parse_args()

    import numpy as np
    import torch

    import lmtune
    from lmtune.data import open_data
    from lmtune.demo import DEMO_TEST, demo_task
    from lmtune.features import common_prefix_length, extract

    env = start(args)
    repeats = args.repeats or (1 if args.quick else 3)
    n = args.n or (48 if args.quick else None)
    bs = args.batch_size

    t0 = time.perf_counter()
    lm = lmtune.load_model(lmtune.DEFAULT_MODEL)
    log(f"model loaded in {time.perf_counter() - t0:.1f} s")
    task = demo_task()
    ds = open_data(DEMO_TEST)
    enc = task.encode(lm.tokenizer, ds, labeled=False)
    ids = enc.input_ids[:n] if n else enc.input_ids
    label_ids = task.label_token_ids(lm.tokenizer)
    lengths = np.array([len(s) for s in ids])
    P = common_prefix_length(ids)
    N = len(ids)

    # Padding the peer computes: per batch of bs in dataset order, every row padded to the batch max.
    peer_tokens = sum(bs_len.max() * len(bs_len) for bs_len in (lengths[s:s + bs] for s in range(0, N, bs)))
    srt = np.sort(lengths)[::-1]
    sorted_tokens = sum(b.max() * len(b) for b in (srt[s:s + bs] for s in range(0, N, bs)))
    sorted_suffix_tokens = sum((b.max() - P) * len(b) for b in (srt[s:s + bs] for s in range(0, N, bs)))
    log(f"{N} prompts, {lengths.min()}-{lengths.max()} tokens (mean {lengths.mean():.1f}), shared prefix {P}")

    paths = {
        "lmtune": lambda x: extract(lm, x, label_ids, batch_size=bs, progress=False).L,
        "lmtune_no_prefix": lambda x: extract(lm, x, label_ids, batch_size=bs, share_prefix=False, progress=False).L,
        "peer": lambda x: peer_extract(lm, x, label_ids, bs),
    }
    # Warm-up: each path once on a few prompts (allocator, oneDNN kernels, lazy imports).
    for name, fn in paths.items():
        t = time.perf_counter()
        fn(ids[:bs])
        log(f"warm-up {name}: {time.perf_counter() - t:.2f} s")

    times = {k: [] for k in paths}
    outputs = {}
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    # Interleaved repeats: machine-load drift hits every path alike.
    for r in range(repeats):
        for name, fn in paths.items():
            t = time.perf_counter()
            L = fn(ids)
            dt = time.perf_counter() - t
            times[name].append(dt)
            outputs[name] = L
            log(f"repeat {r + 1}/{repeats} {name}: {dt:.2f} s ({N / dt:.1f} prompts/s)")
    cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0) / torch.get_num_threads()

    rate = {k: N / median(v) for k, v in times.items()}
    diff_peer = float(np.abs(outputs["lmtune"] - outputs["peer"]).max())
    diff_noprefix = float(np.abs(outputs["lmtune"] - outputs["lmtune_no_prefix"]).max())
    ratio = rate["lmtune"] / rate["peer"]
    agree = diff_peer <= AGREE_TOL
    emit({
        "benchmark": "features",
        "model": lm.name,
        "quick": args.quick,
        "n_prompts": N,
        "batch_size": bs,
        "repeats": repeats,
        "prompt_tokens": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean()),
                          "shared_prefix": int(P)},
        "tokens_computed": {"peer_padded": int(peer_tokens), "lmtune_no_prefix_sorted": int(sorted_tokens),
                            "lmtune_sorted_suffixes": int(sorted_suffix_tokens + P),
                            "real_tokens": int(lengths.sum())},
        "prompts_per_s": rate,
        "seconds": {k: {"median": median(v), "runs": v} for k, v in times.items()},
        "ratio_lmtune_vs_peer": ratio,
        "ratio_lmtune_no_prefix_vs_peer": rate["lmtune_no_prefix"] / rate["peer"],
        "max_abs_diff_label_logits": {"lmtune_vs_peer": diff_peer, "lmtune_vs_lmtune_no_prefix": diff_noprefix,
                                      "tolerance": AGREE_TOL, "agree": agree},
        "label_logit_scale": float(np.abs(outputs["peer"]).max()),
        "process_cpu_share_during_timing": cpu_share,
        "goal": f"lmtune.features.extract >= {GOAL_RATIO:g}x the prompts/s of a plain transformers forward "
                f"pass with dynamic (left) padding, label logits agreeing within {AGREE_TOL:g}",
        "met": bool(ratio >= GOAL_RATIO and agree),
        "environment": env,
    })


if __name__ == "__main__":
    main()
