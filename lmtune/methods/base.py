"""The estimator contract every adaptation method follows, and its label-token classification base.

Every method is configured by plain arguments (``__init__`` only stores them), learns with
``fit(data) -> self`` (learned state ends in ``_``), predicts with ``predict_proba(data)`` (N, K) and
``predict(data)`` (N,) class indices, and saves with ``save(path)`` to a run folder that
:func:`lmtune.load_run` reads back. ``data`` is a :class:`lmtune.data.Dataset` or anything
:func:`lmtune.data.open_data` accepts (a path, ``builtin:reviews:train``).

:class:`LabelTokenClassifier` holds what the label-token methods share: the model, the task and the
route from records to features (prompts, token ids, the cached backbone pass).
"""

from __future__ import annotations

import contextlib
import time
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from lmtune.data import Dataset, open_data
from lmtune.errors import LmtuneError
from lmtune.features import Features, cached_extract, show_progress
from lmtune.models import DEFAULT_MODEL, LM, as_lm
from lmtune.tasks import ClassificationTask


@runtime_checkable
class Estimator(Protocol):
    method: ClassVar[str]

    def fit(self, data) -> "Estimator": ...
    def predict_proba(self, data) -> np.ndarray: ...
    def predict(self, data) -> np.ndarray: ...
    def save(self, path) -> object: ...


def as_dataset(data) -> Dataset:
    return data if isinstance(data, Dataset) else open_data(data)


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax in float64, shifted by the row max for stability."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class LabelTokenClassifier:
    """Shared machinery: model + task -> (Z, L) features for a dataset.

    Parameters
    ----------
    model : LM or str
        A loaded :class:`lmtune.models.LM` or a name for :func:`lmtune.load_model`.
    task : ClassificationTask
    batch_size : int
    progress : bool or None
        Progress bars; ``None`` shows them only on a terminal.
    cache : bool
        Use the on-disk feature cache.
    """

    method: ClassVar[str] = ""
    # The posteriors this method offers through its ``bayes`` parameter (``lmtune fit --bayes MODE``).
    bayes_modes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: "LM | str" = DEFAULT_MODEL, task: ClassificationTask | None = None, *,
                 batch_size: int = 16, progress: bool | None = None, cache: bool = True):
        self.model = model
        self.task = task
        self.batch_size = batch_size
        self.progress = progress
        self.cache = cache

    # -- shared pipeline ------------------------------------------------------------------------------

    @property
    def lm(self) -> LM:
        if not isinstance(self.model, LM):
            self.model = as_lm(self.model)
        return self.model

    def _check_task(self) -> ClassificationTask:
        if not isinstance(self.task, ClassificationTask):
            raise LmtuneError(f"{type(self).__name__} needs a ClassificationTask (template and label words)")
        return self.task

    def features(self, data, labeled: bool = False) -> tuple[Features, np.ndarray | None, Dataset]:
        """(Z, L) for every record, the class indices when ``labeled``, and the dataset itself."""
        ds = as_dataset(data)
        task = self._check_task()
        tok = self.lm.tokenizer
        label_ids = task.label_token_ids(tok)
        enc = task.encode(tok, ds, labeled=labeled, progress=show_progress(self.progress) and len(ds) > 5000)
        t0 = time.perf_counter()
        feats = cached_extract(self.lm, enc.input_ids, label_ids, cache=self.cache, batch_size=self.batch_size,
                               progress=self.progress, desc=f"{self.method}: {ds.path}")
        self.last_extract_seconds_ = time.perf_counter() - t0
        return feats, enc.y, ds

    def logits(self, feats: Features) -> np.ndarray:
        """Adapted label logits (N, K) from features; the zero-shot logits unless a method overrides."""
        return feats.L.astype(np.float64)

    def label_logits(self, data, labeled: bool = False, base: bool = False):
        """Adapted (N, K) label logits, the base model's (when ``base``), the class indices (when
        ``labeled``) and the dataset; one feature pass serves both logits."""
        feats, y, ds = self.features(data, labeled=labeled)
        return self.logits(feats), (np.asarray(feats.L, dtype=np.float64) if base else None), y, ds

    def predict_proba(self, data) -> np.ndarray:
        return softmax(self.label_logits(data)[0])

    def predict(self, data) -> np.ndarray:
        return self.predict_proba(data).argmax(axis=1)

    def base_card(self) -> dict:
        if self.task is None:
            raise LmtuneError(f"{type(self).__name__} has no task")
        card = {"method": self.method, "model": self.lm.name, "model_fingerprint": self.lm.fingerprint,
                "task": self.task.to_dict()}
        if isinstance(self.task, ClassificationTask):
            card["labels"] = self.task.labels
        return card

    @contextlib.contextmanager
    def attached(self, train: bool = False):
        """The model with this method's learned state in it for the block (the base model as it is here:
        methods that change the model override this)."""
        yield {}
