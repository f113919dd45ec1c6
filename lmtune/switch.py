"""Several LoRA adapters on one base model, chosen per call (seed 004: "switch adapters per task").

All adapters are loaded once into one PEFT model (``load_adapter`` under their own names); a call picks
one with ``set_adapter``, which only changes which low-rank branches run. Switching therefore costs
nothing, and memory grows by the adapters' size, not by a copy of the base model per task.

Each adapter keeps its own run's task (template, label words), so one switch can serve, say, a sentiment
adapter and a topic adapter with different labels.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from lmtune.errors import LmtuneError
from lmtune.merge import MERGEABLE
from lmtune.methods.base import as_dataset, softmax
from lmtune.methods.peft_methods import quiet_peft


class AdapterSwitch:
    """LoRA-family runs sharing one loaded base model.

    Parameters
    ----------
    runs : dict of str to path
        Adapter name to run folder (each a lora or adalora run fitted on the same base model).
    model : LM or str, optional
        The base model; by default the one named in the first run's card.
    """

    def __init__(self, runs: dict, model=None, **kwargs):
        from lmtune.methods import load_run

        if not runs:
            raise LmtuneError("AdapterSwitch needs at least one run")
        self.estimators = {}
        lm = model
        for name, path in runs.items():
            est = load_run(path, model=lm, **kwargs)
            if est.method not in MERGEABLE:
                raise LmtuneError(f"{path}: a {est.method} run; only {', '.join(MERGEABLE)} adapters can share "
                                  f"one base model in a switch")
            lm = est.lm
            self.estimators[name] = est
        self.lm = lm
        self._pm = None

    @property
    def names(self) -> list[str]:
        return list(self.estimators)

    def __enter__(self) -> "AdapterSwitch":
        from peft import PeftModel

        names = self.names
        with quiet_peft():
            pm = PeftModel.from_pretrained(self.lm.model, str(self.estimators[names[0]].adapter_dir_),
                                           adapter_name=names[0], is_trainable=False)
        for name in names[1:]:
            pm.load_adapter(str(self.estimators[name].adapter_dir_), adapter_name=name, is_trainable=False)
        self._pm = pm
        return self

    def __exit__(self, *exc) -> None:
        if self._pm is not None:
            self._pm.unload()
            self._pm = None

    @contextlib.contextmanager
    def _active(self):
        if self._pm is not None:
            yield
        else:
            with self:
                yield

    def label_logits(self, data, adapter: str) -> np.ndarray:
        """(N, K) label logits of ``data`` under ``adapter``, with that run's task."""
        if adapter not in self.estimators:
            raise LmtuneError(f"no adapter named {adapter!r}; this switch has {', '.join(self.names)}")
        est = self.estimators[adapter]
        ds = as_dataset(data)
        task = est._check_task()
        tok = self.lm.tokenizer
        label_ids = torch.tensor(task.label_token_ids(tok), device=self.lm.device)
        enc = task.encode(tok, ds, labeled=False)
        with self._active():
            self._pm.set_adapter(adapter)
            return est._logits_of(self.lm, enc.input_ids, label_ids)

    def predict_proba(self, data, adapter: str) -> np.ndarray:
        return softmax(self.label_logits(data, adapter))

    def predict(self, data, adapter: str) -> np.ndarray:
        return self.predict_proba(data, adapter).argmax(axis=1)
