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
