"""Fold a LoRA-family adapter into the base weights: ``W <- W + (alpha / r) B A`` (seed 001).

A merged model has the base model's architecture and cost at inference: no extra matmuls, no adapter
code, and it loads in any tool as a plain Hugging Face model. PEFT's ``merge_and_unload`` does the
arithmetic (including DoRA's magnitude rescaling); this module gives it a copy of the base model, so the
shared base stays unchanged, and writes the result as a model folder that is also an lmtune run folder
(method ``zero-shot`` on the merged weights, with the adapter run's task), so ``lmtune eval`` and
``lmtune predict`` work on it directly.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

from lmtune.errors import LmtuneError
from lmtune.models import LM

MERGEABLE = ("lora", "adalora")


def merged_lm(est) -> LM:
    """A new :class:`LM` whose weights have ``est``'s adapter folded in (``est`` is a fitted LoRA-family run)."""
    from peft import PeftModel

    from lmtune.methods.peft_methods import quiet_peft

    if est.method not in MERGEABLE:
        raise LmtuneError(f"only {', '.join(MERGEABLE)} adapters can be merged into the base weights; "
                          f"this run is {est.method}")
    est._check_fitted()
    base = est.lm
    model = copy.deepcopy(base.model)
    with quiet_peft():
        merged = PeftModel.from_pretrained(model, str(est.adapter_dir_)).merge_and_unload()
    merged.eval()
    h = hashlib.sha256(base.fingerprint.encode())
    h.update((Path(est.adapter_dir_) / "adapter_model.safetensors").read_bytes())
    return LM(model=merged, tokenizer=base.tokenizer, name=f"{base.name}+{est.method}",
              fingerprint=h.hexdigest()[:16], source=base.source)


def merge(run, out, model=None) -> Path:
    """Merge the adapter of run folder ``run`` into its base model and save the result to ``out``.

    Returns the folder, which holds the merged model (safetensors + config + tokenizer) and a
    ``card.json`` that makes it a zero-shot run of the adapter's task on the merged weights.
    """
    from lmtune.methods import load_run
    from lmtune.runs import check_run_destination, write_run

    dest = check_run_destination(out)
    est = load_run(run, model=model, progress=False)
    lm = merged_lm(est)
    card = {**est.base_card(), "method": "zero-shot", "model": str(dest.resolve()), "model_fingerprint": None,
            "merged_from": {"run": str(Path(run).resolve()), "method": est.method, "base_model": est.lm.name}}

    def write(folder: Path) -> None:
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)

    return write_run(dest, card, write)
