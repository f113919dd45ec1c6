"""Plain-text renderings of evaluation results: the side-by-side table and the flip analysis."""

from __future__ import annotations


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` given as (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


METRIC_COLUMNS = [("method", "method"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("nll", "NLL"),
                  ("ece", "ECE"), ("fit_seconds", "fit time (s)"), ("note", "note")]


def metrics_text(ev: dict) -> str:
    """One evaluation as text: headline metrics, per-class scores and the confusion matrix."""
    m = ev["metrics"]
    # _fmt, not :.4f: the report writes an undefined metric as None, which a float format rejects.
    lines = [f"{ev['method']} on {ev['data']['path']} (n={ev['data']['n']}): accuracy {_fmt(m['accuracy'])}, "
             f"macro-F1 {_fmt(m['macro_f1'])}, NLL {_fmt(m['nll'])}, Brier {_fmt(m['brier'])}, "
             f"ECE({m['ece_bins']} bins) {_fmt(m['ece'])}"]
    rows = [{"label": lab, **v} for lab, v in m["per_class"].items()]
    lines.append(table(rows, [("label", "label"), ("precision", "precision"), ("recall", "recall"),
                              ("f1", "F1"), ("support", "support")]))
    cm = m["confusion_matrix"]
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(table([{"true": lab, **{p: n for p, n in zip(cm["labels"], row)}}
                        for lab, row in zip(cm["labels"], cm["matrix"])],
                       [("true", "true \\ pred")] + [(p, p) for p in cm["labels"]]))
    if "flips" in ev:
        lines.append(flips_text(ev["flips"]))
    return "\n".join(lines)


def flips_text(f: dict) -> str:
    """The flip analysis: counts by direction, then a few examples of each."""
    lines = [f"flips against zero-shot: {f['flipped']} of {f['n']} answers changed: "
             f"{f['wrong_to_right']} wrong->right, {f['right_to_wrong']} right->wrong, "
             f"{f['wrong_to_wrong']} wrong->wrong (net {f['net_gain']:+d})"]
    for kind, items in f["examples"].items():
        if not items:
            continue
        lines.append(f"  {kind.replace('_', ' ')}:")
        for ex in items:
            lines.append(f"    line {ex['line']}: [{ex['label']}] zero-shot {ex['zero_shot']} "
                         f"({ex['p_zero_shot']:.2f}) -> {ex['adapted']} ({ex['p_adapted']:.2f}): {ex['text']}")
    return "\n".join(lines)


# -- method comparison (lmtune.compare) ---------------------------------------------------------------

COMPARE_COLUMNS = [("method", "method"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("nll", "NLL"),
                   ("ece", "ECE"), ("brier", "Brier"), ("trainable_params", "trainable params"),
                   ("trainable_share", "share of base"), ("adapter_bytes", "adapter size"),
                   ("train_seconds", "train (s)"), ("fit_memory_bytes", "fit memory"),
                   ("peak_rss_bytes", "peak RSS"), ("latency_ms", "latency (ms/ex)"),
                   ("merged_latency_ms", "merged (ms/ex)")]


def _bytes(n) -> str | None:
    if n is None:
        return None
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _display_row(r: dict) -> dict:
    """A comparison row with counts, shares, sizes and times formatted for reading."""
    d = dict(r)
    d["trainable_params"] = None if r["trainable_params"] is None else f"{r['trainable_params']:,}"
    share = r["trainable_share"]
    d["trainable_share"] = None if share is None else f"{100 * share:.3g}%"
    for k in ("adapter_bytes", "fit_memory_bytes", "peak_rss_bytes"):
        d[k] = _bytes(r[k])
    d["train_seconds"] = None if r["train_seconds"] is None else f"{r['train_seconds']:.2f}"
    for k in ("latency_ms", "merged_latency_ms"):
        d[k] = None if r[k] is None else f"{r[k]:.3g}"
    return d


def compare_table(rows: list[dict]) -> str:
    """The comparison rows of :func:`lmtune.compare.compare` as one Markdown table (with the forgetting
    column when a suite was scored)."""
    cols = COMPARE_COLUMNS + ([("forget_lm_delta", "held-text loss change")]
                              if any(r.get("forget_lm_delta") is not None for r in rows) else [])
    return table([_display_row(r) for r in rows], cols)


def compare_markdown(result: dict) -> str:
    """The whole comparison report: what was compared, the table, and how each column was measured."""
    env = result["environment"]

    def data(d):
        return f"`{d['path']}` (n={d['n']}, sha256 {d['sha256'][:12]})"

    lines = [f"# Method comparison on {result['model']}", "",
             f"Train {data(result['train'])}; test {data(result['test'])}"
             + (f"; validation {data(result['val'])}" if result.get("val") else "") + ".",
             f"Template {result['task']['template']!r}; torch {env['torch']} on {env['device']} "
             f"({env['cpu']}, {env['threads']} threads).", "",
             compare_table(result["rows"]), "",
             "## How each column was measured", "",
             "The five axes on which adaptation methods trade against each other, and the columns for each:", "",
             "- **Quality** (accuracy, macro-F1, NLL, ECE with 15 equal-width bins, multi-class Brier): "
             "`lmtune.evaluate` on the whole test set.",
             "- **Parameter efficiency** (trainable params, share of base, adapter size): the numbers the method "
             "learns (closed-form: the d x K correction and K biases; zero-shot: none), as a share of the base "
             "model's parameters (a tied embedding counted once); the adapter size is every file of the saved "
             "run folder except `card.json`. last-layers, norm-tuning and full store the base model's own "
             "tensors they changed.",
             "- **Memory** (fit memory, peak RSS): the resident set size of the process during `fit`. Peak RSS "
             "is the kernel's high-water mark over the fit alone (reset before it, see "
             f"`lmtune.profiling`; measured by `{', '.join(sorted({r['memory_method'] for r in result['rows']}))}`) "
             "and includes the loaded base model; fit memory is that peak minus the resident size when the fit "
             "began, the memory the method itself needed. Freed memory is returned to the system before each "
             "fit; memory the allocator keeps from an earlier method can still make a later one look smaller.",
             "- **Training speed** (train (s)): wall time of `fit`, with the feature cache off, so the closed-form "
             "fit includes its feature extraction; this is the cost of a first fit, not of a refit.",
             f"- **Inference cost** (latency): a fresh estimator loaded from the run folder predicts the first "
             f"{result['latency_examples']} test records with the feature cache off; the median of 3 repeats, "
             f"divided by the number of records. A LoRA-family adapter is attached for every call; merged is "
             f"the same measurement on a copy of the base model with the adapter folded into its weights (no "
             f"extra matmuls), for the methods that allow it.", ""]
    return "\n".join(lines) + calibration_markdown(result) + forgetting_markdown(result)


def forgetting_markdown(result: dict) -> str:
    """The report's forgetting section: every suite task's main metric change per method."""
    from lmtune.forgetting import headline

    forget = result.get("forgetting")
    if not forget:
        return ""
    rows, names = [], []
    for method, f in forget.items():
        row = {"method": method}
        for task, h in headline(f).items():
            key = f"{task} ({h['metric']})"
            row[key] = h["delta"]
            if key not in names:
                names.append(key)
        rows.append(row)
    return ("\n## Forgetting\n\nThe change (adapted - base) of each suite task's main metric when the method's "
            "learned state is in the model; the LM loss and NLL are better when lower, the others when higher. "
            "Methods that leave the network unchanged (zero-shot, closed-form) change nothing by construction.\n\n"
            + table(rows, [("method", "method")] + [(n, n) for n in names]) + "\n")


CALIBRATION_COLUMNS = [("method", "method"), ("temperature", "T"), ("accuracy", "accuracy"), ("nll", "NLL"),
                       ("ece", "ECE"), ("brier", "Brier"), ("diagram", "reliability diagram")]


def calibration_markdown(result: dict) -> str:
    """The report's calibration section: each method, and each temperature-scaled one when validation data
    was given, with its reliability diagram."""
    calib = result.get("calibration")
    if not calib or not calib.get("methods"):
        return ""
    scaled = result.get("val") is not None
    rows = []
    for r in result["rows"]:
        link = f"[png](reliability/{r['method']}.png)"
        rows.append({**r, "temperature": None, "diagram": link})
        if scaled and r.get("temperature") is not None:
            at_bound = (calib["methods"].get(r["method"]) or {}).get("at_bound")
            rows.append({"method": f"{r['method']}, temperature-scaled",
                         "temperature": f"{r['temperature']:.4g}" + (" (search bound)" if at_bound else ""),
                         "accuracy": r["accuracy"], "nll": r["ts_nll"], "ece": r["ts_ece"], "brier": r["ts_brier"],
                         "diagram": link})
    lines = ["", "## Calibration", "",
             f"Top-label calibration on the test set: ECE over {calib['n_bins']} equal-width confidence bins, NLL "
             "and Brier (as in the table above); each diagram plots the accuracy of every bin against its mean "
             "confidence, with the records per bin underneath. `reliability.png` overlays all methods.", ""]
    if scaled:
        lines += ["Each method is also shown **temperature-scaled**: its logits divided by the one temperature T "
                  "that minimises the NLL on the validation data (`lmtune.calibration`). Accuracy does not change "
                  "(T > 0 keeps every argmax); T > 1 means the method was over-confident. A method with a "
                  "posterior (`NAME+MODE`) should beat its plain method's temperature-scaled row to earn its "
                  "cost on calibration.", ""]
    else:
        lines += ["No validation data was given (`--val`), so no temperature-scaled rows.", ""]
    lines += [table(rows, CALIBRATION_COLUMNS), ""]
    return "\n".join(lines)


def plot_quality(rows: list[dict], x_key: str, xlabel: str, title: str):
    """Test accuracy against ``x_key`` on a log axis, one labelled point per method.

    A method that trains nothing (zero-shot) has no place on a log axis of parameters or training time; it
    is drawn as a dashed horizontal line, the baseline the others are read against. Each method keeps its
    colour from plot to plot (its place in :data:`lmtune.methods.METHODS`). Returns a
    ``matplotlib.figure.Figure`` (no pyplot, so the global backend is left alone).
    """
    import math

    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from lmtune.methods import METHODS

    order = list(METHODS)
    palette = colormaps["tab10"]

    def colour(r):
        base = r["method"].partition("+")[0]  # a posterior (closed-form+exact) keeps its method's colour
        return palette(order.index(base) % 10) if base in order else "0.2"

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot()
    rated = [r for r in rows if r.get("accuracy") is not None]
    points = sorted((r for r in rated if r.get("trainable_params") and r.get(x_key)), key=lambda r: r[x_key])
    for i, r in enumerate(points):
        ax.scatter(r[x_key], r["accuracy"], s=40, color=colour(r), zorder=3)
        # alternate above/below so neighbours with equal accuracy do not print over each other
        ax.annotate(r["method"], (r[x_key], r["accuracy"]), textcoords="offset points",
                    xytext=(5, 5 if i % 2 == 0 else -13), fontsize=9, color=colour(r))
    for r in rated:
        if not r.get("trainable_params"):
            ax.axhline(r["accuracy"], color=colour(r), linestyle="--", linewidth=1)
            ax.annotate(f"{r['method']} ({r['accuracy']:.3f})", (0.01, r["accuracy"]),
                        xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 4), fontsize=9,
                        color=colour(r))
    if points:
        ax.set_xscale("log")
        xs = [r[x_key] for r in points]
        ax.set_xlim(min(xs) / 3, max(xs) * 4)
        # plain numbers; over a narrow range also at 2 and 5 times a power of ten (the defaults crowd them)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
        narrow = max(xs) / min(xs) < 100
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:,.6g}" if narrow and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def generation_text(ev: dict) -> str:
    """A generation run's evaluation: each metric for the run and the base model, then a few answers."""
    from lmtune.forgetting import flat_scores

    tuned, base = flat_scores(ev["metrics"]), flat_scores(ev["base"]) if ev.get("base") else {}
    rows = [{"metric": k, "run": tuned[k], "base": base.get(k), "change": (tuned[k] - base[k]) if k in base else None}
            for k in tuned]
    cols = [("metric", "metric"), ("run", ev["method"]), ("base", "base model"), ("change", "change")]
    gen = ev["generation"]
    lines = [f"{ev['method']} on {ev['data']['path']} (n={ev['data']['n']}); {gen['new_tokens']} tokens generated "
             f"in {gen['seconds']:.1f} s; finish reasons {gen['finish_reasons']}", "",
             table(rows, cols if base else cols[:2])]
    if "bleu" in ev["metrics"]:
        lines.append(f"BLEU signature: {ev['metrics']['bleu']['signature']}")
    for ex in ev.get("examples", []):
        lines.append(f"\nline {ex['line']}: reference {ex['reference']!r}\n  answer {ex['answer']!r}"
                     + (f"\n  base   {ex['base_answer']!r}" if "base_answer" in ex else ""))
    return "\n".join(lines)


def forgetting_text(res: dict) -> str:
    """Each suite task's scores before and after adaptation, and the change."""
    rows = []
    for name, t in res["tasks"].items():
        for k, d in t["delta"].items():
            rows.append({"task": name, "type": t["type"], "metric": k, "base": t["base"][k], "adapted": t["adapted"][k],
                         "change": d, "direction": "worse" if (d > 0) == (t["worse"][k] == "up") and d != 0 else
                         ("better" if d != 0 else "same")})
    head = (f"{res['method']} on {res['model']}: the base model with and without the run's learned state"
            + ("" if res["changes_model"] else " (this method leaves the network unchanged: every change is 0)"))
    cols = [("task", "task"), ("type", "type"), ("metric", "metric"), ("base", "base"), ("adapted", "adapted"),
            ("change", "change"), ("direction", "")]
    return head + "\n\n" + table(rows, cols)
