"""Serial bottleneck adapters (Houlsby et al. 2019), written here because PEFT does not provide them.

Each adapted transformer block gets two small modules, one after the attention output projection and one
after the feed-forward output projection, each applied *before* the residual addition::

    h <- h + up(act(down(h)))          down: d -> m, up: m -> d, m = bottleneck << d

``up`` starts at zero, so the adapted model equals the base model at initialisation and training starts
from the zero-shot answers. Houlsby's adapters also train the blocks' layer norms; here that is left to
``norm-tuning`` so each method has one clear parameter set (``placement="mlp"`` gives the single-adapter
variant of Pfeiffer et al. 2021).

The adapters attach with forward hooks on the projection modules (``o_proj`` and ``down_proj`` in the
Llama family, found by name), removed again after every pass, so the base model is never changed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmtune.errors import LmtuneError
from lmtune.methods.peft_methods import parse_layers
from lmtune.methods.tuned import TunedClassifier, backbone_of, n_layers
from lmtune.models import DEFAULT_MODEL, LM

ADAPTER_FILE = "adapters.safetensors"
SITES = {"attn": ("o_proj", "out_proj", "dense"), "mlp": ("down_proj", "fc2", "c_proj")}


class Bottleneck(torch.nn.Module):
    """``x + up(gelu(down(x)))`` with ``up`` zero at initialisation."""

    def __init__(self, d: int, m: int):
        super().__init__()
        self.down = torch.nn.Linear(d, m)
        self.up = torch.nn.Linear(m, d)
        torch.nn.init.normal_(self.down.weight, std=d ** -0.5)
        torch.nn.init.zeros_(self.down.bias)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.nn.functional.gelu(self.down(x)))


def _site(layer: torch.nn.Module, kind: str) -> torch.nn.Module:
    for name, mod in layer.named_modules():
        if name.rsplit(".", 1)[-1] in SITES[kind] and isinstance(mod, torch.nn.Linear):
            return mod
    raise LmtuneError(f"adapter: cannot find the {kind} output projection ({'/'.join(SITES[kind])}) in "
                      f"{type(layer).__name__}")


class AdapterClassifier(TunedClassifier):
    """Serial bottleneck adapters after the attention and feed-forward outputs of each block (Houlsby).

    Parameters
    ----------
    bottleneck : int
        Width m of each adapter's hidden layer.
    layers : str or int or None
        Blocks to adapt: n (the top n), a-b, or i,j,k; None adapts all. With only top blocks adapted, their
        frozen inputs are computed once, not every epoch.
    placement : str
        both (Houlsby: after attention and after the feed-forward block) or mlp (Pfeiffer: after the
        feed-forward block only).
    """

    method = "adapter"
    default_lr = 3e-3  # built-in reviews, top 4 blocks, 3 epochs: test accuracy 0.84
    options = ("bottleneck", "layers", "placement")

    def __init__(self, model=DEFAULT_MODEL, task=None, *, bottleneck: int = 64, layers=None,
                 placement: str = "both", **kwargs):
        super().__init__(model, task, **kwargs)
        self.bottleneck = bottleneck
        self.layers = layers
        self.placement = placement

    def _kinds(self) -> tuple[str, ...]:
        if self.placement not in ("both", "mlp"):
            raise LmtuneError(f"placement must be both or mlp, got {self.placement!r}")
        return ("attn", "mlp") if self.placement == "both" else ("mlp",)

    def _layer_ids(self, lm: LM) -> list[int]:
        return parse_layers(self.layers, n_layers(lm)) or list(range(n_layers(lm)))

    def _build(self, lm: LM) -> torch.nn.ModuleDict:
        if self.bottleneck < 1:
            raise LmtuneError(f"bottleneck must be at least 1, got {self.bottleneck}")
        d = lm.hidden_size
        dtype = next(lm.model.parameters()).dtype
        mods = {f"{i}_{k}": Bottleneck(d, self.bottleneck) for i in self._layer_ids(lm) for k in self._kinds()}
        return torch.nn.ModuleDict(mods).to(device=lm.device, dtype=dtype)

    def _init_state(self, lm: LM) -> None:
        self.adapters_ = self._build(lm)

    def _frozen_below(self, lm: LM) -> int:
        return min(self._layer_ids(lm))

    @contextlib.contextmanager
    def _attach(self, lm: LM, train: bool):
        if not train:
            self._check_fitted()
        layers = backbone_of(lm).layers
        handles = []
        for key, mod in self.adapters_.items():
            i, kind = key.split("_", 1)
            site = _site(layers[int(i)], kind)
            handles.append(site.register_forward_hook(lambda m, args, out, a=mod: a(out)))
        self.adapters_.train(train)
        try:
            yield {f"adapters.{n}": p for n, p in self.adapters_.named_parameters()} if train else {}
        finally:
            for h in handles:
                h.remove()
            self.adapters_.eval()

    def _write_files(self, folder: Path) -> None:
        save_file({n: t.detach().contiguous() for n, t in self.adapters_.state_dict().items()},
                  str(folder / ADAPTER_FILE), metadata={"format": "lmtune.adapter"})

    def _load_files(self, folder: Path) -> None:
        f = folder / ADAPTER_FILE
        if not f.is_file():
            raise LmtuneError(f"{folder}: {ADAPTER_FILE} missing: not a complete adapter run")
        self.adapters_ = self._build(self.lm)
        try:
            self.adapters_.load_state_dict(load_file(str(f)))
        except RuntimeError as e:
            raise LmtuneError(f"{f}: does not match the adapter configuration in card.json ({e})") from None
