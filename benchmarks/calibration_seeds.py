"""Summarise several ``bench_calibration.py`` runs (one per seed) into one JSON: each method's ECE against
the MAP's, seed by seed and on average, and the Laplace step's time against an epoch.

One run scores 200 test records, where the ECE of a calibrated predictor is itself 0.02 to 0.06 (the
"calibrated floor" each run reports), so a single seed's ECE ratio carries an interval of about a factor of
two. Seeds differ in the train/validation split, the adapter's initialisation and the dropout draws; the
mean over seeds and the count of seeds meeting the goal say more than any one of them.

Usage: .venv/bin/python benchmarks/calibration_seeds.py RESULT.json [RESULT.json ...] [--out PATH] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402

REFERENCE = "lora (MAP)"


def summarise(runs: list[dict]) -> dict:
    goal = runs[0]["goals"]["ece_ratio_goal"]
    names = [n for n in runs[0]["rows"] if all(n in r["rows"] for r in runs)]
    ref_mean = float(np.mean([r["rows"][REFERENCE]["ece"] for r in runs]))
    methods = {}
    for name in names:
        per_seed = []
        for r in runs:
            row, ref = r["rows"][name], r["rows"][REFERENCE]
            sampling = row.get("ece_sampling") or {}  # runs before lmtune.metrics.ece_sampling lack it
            n_test = r["setup"]["n_test"]
            per_seed.append({
                "seed": r["setup"]["seed"], "accuracy": row["accuracy"], "nll": row["nll"], "ece": row["ece"],
                "calibrated_floor": sampling.get("calibrated_floor"),
                "ece_ratio": row["ece"] / ref["ece"] if ref["ece"] else None,
                "ece_ratio_interval": sampling.get("ratio_interval"),
                # half the MAP's ECE below what a perfectly calibrated predictor with this row's confidences
                # scores on these records: the goal then asks for more than calibration can show here
                "goal_below_own_floor": (sampling.get("calibrated_floor") is not None
                                         and ref["ece"] * goal < sampling["calibrated_floor"]),
                "accuracy_change": row["accuracy"] - ref["accuracy"],
                "accuracy_noise": math.sqrt(ref["accuracy"] * (1 - ref["accuracy"]) / n_test),
                "prior_precision": row.get("prior_precision")})
        ratios = [s["ece_ratio"] for s in per_seed if s["ece_ratio"] is not None]
        mean_ece = float(np.mean([s["ece"] for s in per_seed]))
        methods[name] = {
            "per_seed": per_seed,
            "mean_accuracy": float(np.mean([s["accuracy"] for s in per_seed])),
            "mean_nll": float(np.mean([s["nll"] for s in per_seed])),
            "mean_ece": mean_ece,
            "mean_calibrated_floor": (float(np.mean([s["calibrated_floor"] for s in per_seed]))
                                      if all(s["calibrated_floor"] is not None for s in per_seed) else None),
            "mean_ece_ratio": float(np.mean(ratios)) if ratios else None,
            # the ratio of mean ECEs weighs every seed's records alike
            "ratio_of_mean_ece": mean_ece / ref_mean if ref_mean else None,
            "mean_accuracy_change": float(np.mean([s["accuracy_change"] for s in per_seed])),
            "seeds_goal_below_own_floor": sum(1 for s in per_seed if s["goal_below_own_floor"]),
            "seeds_meeting_goal": sum(1 for s in per_seed if s["ece_ratio"] is not None and s["ece_ratio"] <= goal
                                      and abs(s["accuracy_change"]) <= s["accuracy_noise"]),
        }
    # a cross-validated run (bench_calibration --folds) holds one cost per fold
    cost = [c for r in runs for c in r["laplace_cost"].get("per_fold", [r["laplace_cost"]])]
    timing = {
        "laplace_over_epoch": [c["laplace_over_epoch"] for c in cost],
        "sampled_curvature_over_epoch": [c["sampled_curvature"]["over_epoch"] for c in cost
                                         if c.get("sampled_curvature")],
        "laplace_peak_rss_bytes": [c["laplace_peak_rss_bytes"] for c in cost],
        "training_peak_rss_bytes": [c["training_peak_rss_bytes"] for c in cost],
    }
    return {"benchmark": "calibration_seeds", "goal_ece_ratio": goal, "seeds": [r["setup"]["seed"] for r in runs],
            "epochs": sorted({r["setup"]["lora"]["epochs"] for r in runs}),
            "commits": sorted({str(r["environment"].get("lmtune_commit")) for r in runs}),
            "methods": methods, "laplace_cost": timing}


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    head = ("| method | " + " | ".join(f"seed {s}: acc / ECE (x MAP)" for s in seeds)
            + f" | mean ECE (x MAP's mean) | seeds at <= {summary['goal_ece_ratio']}x |")
    lines = [head, "|---|" + "---:|" * (len(seeds) + 2)]
    for name, m in summary["methods"].items():
        cells = [f"{s['accuracy']:.3f} / {s['ece']:.3f} ({s['ece_ratio']:.2f})" for s in m["per_seed"]]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {m['mean_ece']:.3f} ({m['ratio_of_mean_ece']:.2f}) | {m['seeds_meeting_goal']} of {len(seeds)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table after the JSON")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    summary = summarise(runs)
    if args.out:
        save(summary, args.out)
    print(json.dumps(summary, indent=1))
    if args.markdown:
        print(markdown(summary))


if __name__ == "__main__":
    main()
