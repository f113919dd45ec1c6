"""Zero-shot label-token classification: the baseline every method is compared with.

``p(y = k | x) = softmax_k(L)`` with ``L = z_t A[:, labels]`` the logits of the K label tokens at the
prompt's last position (the model's own answer distribution restricted to the label words).
"""

from __future__ import annotations

from pathlib import Path

from lmtune.methods.base import LabelTokenClassifier
from lmtune.runs import write_run


class ZeroShotClassifier(LabelTokenClassifier):
    """The base model's label-token distribution; ``fit`` only records the task."""

    method = "zero-shot"

    def fit(self, data=None) -> "ZeroShotClassifier":
        self._check_task()
        self.fitted_ = True
        return self

    def save(self, path: str | Path) -> Path:
        return write_run(path, self.base_card(), lambda folder: None)

    @classmethod
    def from_card(cls, card: dict, folder: Path, model, **kwargs) -> "ZeroShotClassifier":
        from lmtune.tasks import ClassificationTask

        est = cls(model, ClassificationTask.from_dict(card["task"]), **kwargs)
        est.fitted_ = True
        return est
