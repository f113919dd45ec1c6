"""Warm model load from lmtune's safetensors cache vs the GGUF load every call would otherwise pay.

Measures, each in a fresh Python process (nothing shared in memory between loads):

* ``lmtune``: ``lmtune.load_model("smollm2-135m", reuse=False)`` with the dequantized cache present
  (fingerprint of the GGUF file + ``from_pretrained`` of the cached float32 safetensors folder);
* ``peer``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`` plus
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` on the same GGUF file (found with
  ``lmtune.models.builtin_gguf_path``), i.e. what every load costs without the cache.

The timed span is the load call(s) only. The imports of torch, transformers and the transformers
modules both loads need (model classes, tokenizer backend; transformers imports them lazily on the first
``from_pretrained``) are the same for both, are done before the timed span and are reported separately
(``import_s``); the ratio including them (``fresh_process``: import + load) is reported too. Both loaded models are
run on one fixed prompt and their full logits compared (max abs difference).

Goal: warm load >= 10x faster than the GGUF load (median vs median).

Usage: .venv/bin/python benchmarks/bench_model_load.py [--quick] [--warm-repeats N] [--gguf-repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_wait_idle, emit, log, median, start  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "Review: The soup was cold and the waiter ignored us.\nIs this review positive? Answer yes or no."
GOAL_SPEEDUP = 10.0


# --------------------------------------------------------------------------------------------------
# child: one load in a fresh process
# --------------------------------------------------------------------------------------------------
def child(kind: str, logits_out: str | None) -> None:
    t0 = time.perf_counter()
    import numpy as np
    import torch
    import transformers  # noqa: F401

    import lmtune
    from lmtune.models import builtin_gguf_path

    # transformers imports its model and tokenizer modules lazily, on the first from_pretrained (several
    # seconds here: modeling_utils, the Llama model, the tokenizers backend). Both loads need exactly these
    # modules, so they are imported before the timed span and counted in import_s, not in load_s.
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.tokenization_utils_tokenizers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    t_import = time.perf_counter() - t0
    if kind == "warm":
        t1 = time.perf_counter()
        lm = lmtune.load_model(MODEL, reuse=False)
        t_load = time.perf_counter() - t1
        model, tok = lm.model, lm.tokenizer
    elif kind == "gguf":
        gguf = builtin_gguf_path(MODEL)
        t1 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.eval()
        t_load = time.perf_counter() - t1
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    out = {"kind": kind, "import_s": t_import, "load_s": t_load,
           "dtype": str(next(model.parameters()).dtype), "n_params": sum(p.numel() for p in model.parameters())}
    if logits_out:
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0].float().numpy()
        np.savez(logits_out, logits=logits, ids=ids[0].numpy())
    print(json.dumps(out), flush=True)


def run_child(kind: str, logits_out: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    if logits_out:
        cmd += ["--logits-out", logits_out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log(proc.stderr)
        raise RuntimeError(f"child {kind} failed with exit code {proc.returncode}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


# --------------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run: 2 warm loads, 1 GGUF load")
    ap.add_argument("--warm-repeats", type=int, default=None, help="timed warm loads (default 3, quick 2)")
    ap.add_argument("--gguf-repeats", type=int, default=None, help="timed GGUF loads (default 2, quick 1)")
    add_wait_idle(ap)
    ap.add_argument("--child", choices=["warm", "gguf"], help=argparse.SUPPRESS)
    ap.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.logits_out)
        return

    import numpy as np

    from lmtune.models import builtin_gguf_path, cache_dir, gguf_fingerprint

    warm_n = args.warm_repeats or (2 if args.quick else 3)
    gguf_n = args.gguf_repeats or (1 if args.quick else 2)
    env = start(args)

    gguf = builtin_gguf_path(MODEL)
    fp = gguf_fingerprint(gguf)
    cached = cache_dir() / "models" / f"{gguf.stem}-{fp}"
    cache_build = None
    if not (cached / "config.json").is_file():
        log(f"cache {cached} absent: building it (first load) ...")
        cache_build = run_child("warm")
        log(f"  built in {cache_build['load_s']:.1f} s")
    else:
        log(f"cache present: {cached}")

    with tempfile.TemporaryDirectory() as tmp:
        # Untimed warm-up: brings the cached safetensors into the OS page cache, as on any later load.
        log("warm-up load (untimed) ...")
        run_child("warm")
        warm, gg = [], []
        # Interleave the two kinds so slow drifts in machine load hit both alike.
        for i in range(max(warm_n, gguf_n)):
            if i < gguf_n:
                r = run_child("gguf", str(Path(tmp) / "gguf.npz") if i == 0 else None)
                log(f"gguf load {i + 1}/{gguf_n}: {r['load_s']:.2f} s (process {r['process_wall_s']:.1f} s)")
                gg.append(r)
            if i < warm_n:
                r = run_child("warm", str(Path(tmp) / "warm.npz") if i == 0 else None)
                log(f"warm load {i + 1}/{warm_n}: {r['load_s']:.2f} s (process {r['process_wall_s']:.1f} s)")
                warm.append(r)
        a, b = np.load(Path(tmp) / "warm.npz"), np.load(Path(tmp) / "gguf.npz")
        same_ids = bool(np.array_equal(a["ids"], b["ids"]))
        max_abs = float(np.abs(a["logits"] - b["logits"]).max()) if same_ids else None
        n_tokens = int(len(a["ids"]))

    warm_med = median([r["load_s"] for r in warm])
    gguf_med = median([r["load_s"] for r in gg])
    speedup = gguf_med / warm_med
    proc_speedup = median([r["process_wall_s"] for r in gg]) / median([r["process_wall_s"] for r in warm])
    fresh_warm = median([r["import_s"] + r["load_s"] for r in warm])
    fresh_gguf = median([r["import_s"] + r["load_s"] for r in gg])
    emit({
        "benchmark": "model_load",
        "model": MODEL,
        "gguf_file": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "cache_folder": str(cached),
        "cache_bytes": sum(p.stat().st_size for p in cached.iterdir() if p.is_file()),
        "cache_built_in_this_run_s": None if cache_build is None else cache_build["load_s"],
        "quick": args.quick,
        "lmtune_warm_load_s": {"median": warm_med, "runs": [r["load_s"] for r in warm]},
        "peer_gguf_load_s": {"median": gguf_med, "runs": [r["load_s"] for r in gg]},
        "speedup": speedup,
        "process_wall_s": {"lmtune_warm": [r["process_wall_s"] for r in warm],
                           "peer_gguf": [r["process_wall_s"] for r in gg], "speedup": proc_speedup},
        "import_s_median": median([r["import_s"] for r in warm + gg]),
        "fresh_process_import_plus_load_s": {"lmtune_warm": fresh_warm, "peer_gguf": fresh_gguf,
                                             "speedup": fresh_gguf / fresh_warm},
        "logits_check": {"prompt_tokens": n_tokens, "same_token_ids": same_ids, "max_abs_diff": max_abs,
                         "dtype": [warm[0]["dtype"], gg[0]["dtype"]]},
        "goal": f"warm load from the lmtune cache >= {GOAL_SPEEDUP:g}x faster than the GGUF load "
                "(median load-call time), with identical logits",
        "met": bool(speedup >= GOAL_SPEEDUP and same_ids and max_abs is not None and max_abs <= 1e-5),
        "environment": env,
    })


if __name__ == "__main__":
    main()
