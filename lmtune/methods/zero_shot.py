"""Zero-shot label-token classification: the baseline every method is compared with.

``p(y = k | x) = softmax_k(L)`` with ``L = z_t A[:, labels]`` the logits of the K label tokens at the
prompt's last position (the model's own answer distribution restricted to the label words).
"""

from __future__ import annotations

from pathlib import Path

from lmtune.methods.base import LabelTokenClassifier, as_dataset
from lmtune.runs import write_run


class ZeroShotClassifier(LabelTokenClassifier):
    """The base model's label-token distribution (or, for a generation task, its own answers); ``fit``
    learns nothing."""

    method = "zero-shot"

    def fit(self, data=None) -> "ZeroShotClassifier":
        """Record the task; when ``data`` is given, validate it as training data would be (fields, labels)."""
        from lmtune.instruct import GenerationTask
        from lmtune.mixture import as_mixture

        if isinstance(self.task, GenerationTask):
            if data is not None:
                as_mixture(data).encode(self.task, self.lm.tokenizer)
        elif data is not None:
            self._check_task().encode(self.lm.tokenizer, as_dataset(data), labeled=True)
        else:
            self._check_task()
        self.fitted_ = True
        return self

    def save(self, path: str | Path) -> Path:
        return write_run(path, self.base_card(), lambda folder: None)

    @classmethod
    def from_card(cls, card: dict, folder: Path, model, **kwargs) -> "ZeroShotClassifier":
        from lmtune.instruct import task_from_dict

        est = cls(model, task_from_dict(card["task"]), **kwargs)
        est.fitted_ = True
        return est
