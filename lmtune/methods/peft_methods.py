"""LoRA and its family, and prompt tuning, through HF PEFT (seeds 001, 002, 003, 004).

PEFT does these well and its file format is what the ecosystem loads, so lmtune uses it for the adapter
modules, their initialisation (PiSSA's SVD, DoRA's magnitude split, AdaLoRA's SVD-form factors and rank
allocator) and their saving; lmtune supplies the objective, the training loop and the evaluation.

A run folder of these methods *is* a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``), beside lmtune's ``card.json``; so ``PeftModel.from_pretrained(base, run)``
loads it, and ``merge`` folds it into the base weights.

Departures from PEFT's defaults, and why:

* **PiSSA** initialises ``B A`` from the top singular triplets of ``W`` and *changes the base weight* to
  the residual ``W - B A``. Saved as-is, such an adapter would need that altered base. lmtune saves it the
  way PEFT recommends for sharing: converted to an ordinary LoRA of rank ``2r`` against the original
  ``W`` (``path_initial_model_for_weight_conversion``), and restores the original ``W`` in memory, so the
  shared base model is unchanged.
* **AdaLoRA** needs two things PEFT leaves to a training loop: its rank allocator called after every
  optimizer step (``update_and_allocate``, before the gradients are cleared) and its orthogonality penalty
  added to the loss (PEFT adds it only inside its own ``forward`` with ``labels``). lmtune does both; the
  schedule (``tinit``, ``tfinal``, ``total_step``) comes from the real number of optimizer steps.
* **Prompt tuning** is initialised from the embeddings of a text (tiled to the number of virtual tokens)
  by lmtune, since PEFT's text initialisation loads a tokenizer by hub name.
* **LoRA dropout on the CPU** (:class:`FastDropout`): torch's CPU dropout draws its mask with
  ``bernoulli_``, which took 10% of a LoRA training step of the default model (profile of one step of 8
  records, 2 threads); drawing ``rand >= p`` instead made the step's forward and backward 7% faster (1.40
  against 1.51 s, medians of an A/B in one process). While training on the CPU, lmtune swaps PEFT's
  ``nn.Dropout`` modules for one that draws ``rand >= p`` from the same generator and keeps a boolean
  mask for the backward pass: the same distribution (each element kept with probability ``1 - p``,
  scaled by ``1 / (1 - p)``), not the same draws. CUDA keeps torch's fused kernel. In the plain case
  (one vanilla adapter, no hooks) the whole branch runs as one function that draws only the dropped
  positions (:mod:`lmtune.lean_lora`); FastDropout serves the other cases.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

from lmtune.errors import LmtuneError
from lmtune.lean_lora import lean_lora
from lmtune.methods.tuned import TunedClassifier, backbone_of, n_layers
from lmtune.models import DEFAULT_MODEL, LM

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def parse_layers(spec, total: int) -> list[int] | None:
    """``None`` (all), ``n`` (the top n layers), ``"a-b"`` (inclusive range) or ``"i,j,k"``."""
    if spec is None or spec == "" or spec == "all":
        return None
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        n = int(spec)
        if not 1 <= n <= total:
            raise LmtuneError(f"layers: the model has {total} layers; cannot take the top {n}")
        return list(range(total - n, total))
    if isinstance(spec, (list, tuple)):
        out = [int(i) for i in spec]
    elif "-" in str(spec):
        a, b = (int(x) for x in str(spec).split("-", 1))
        out = list(range(a, b + 1))
    else:
        out = [int(x) for x in str(spec).split(",")]
    bad = [i for i in out if not 0 <= i < total]
    if bad or not out:
        raise LmtuneError(f"layers: {spec!r} names layers outside 0..{total - 1}")
    return sorted(set(out))


class _KeepMask(torch.autograd.Function):
    """``x * keep * scale``; the backward needs only the boolean ``keep``."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class FastDropout(torch.nn.Dropout):
    """Inverted dropout whose mask is ``rand >= p`` (float32 uniforms from torch's generator): the
    distribution of ``nn.Dropout`` at less than half its cost on the CPU (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return torch.zeros_like(x)
        draw = torch.rand(x.shape, device=x.device, dtype=torch.float32)
        keep = draw >= self.p
        del draw
        return _KeepMask.apply(x, keep, 1.0 / (1.0 - self.p))


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` inside ``model``'s LoRA dropout dicts for :class:`FastDropout`;
    returns how many were swapped."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for key, d in list(drops.items()):
                if type(d) is torch.nn.Dropout:
                    drops[key] = FastDropout(d.p)
                    n += 1
    return n


@contextlib.contextmanager
def quiet_peft():
    """PEFT still asks transformers for the renamed ``is_gradient_checkpointing``: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _private_dir(owner) -> Path:
    d = Path(tempfile.mkdtemp(prefix="lmtune-adapter-"))
    weakref.finalize(owner, shutil.rmtree, str(d), True)
    return d


class PeftClassifier(TunedClassifier):
    """Base of the PEFT-backed methods: the learned state is a saved PEFT adapter folder."""

    def _peft_config(self, lm: LM, n_steps: int):
        raise NotImplementedError

    def _init_state(self, lm: LM) -> None:
        self.adapter_dir_ = None

    def _n_steps(self) -> int:
        n = getattr(self, "_n_train", 0)
        per_epoch = math.ceil(n / self.batch_size) if n else 1
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def _prepare(self, pm, lm: LM) -> None:
        """Hook after a fresh adapter is created (initialisations PEFT does not do)."""

    @contextlib.contextmanager
    def _attach(self, lm: LM, train: bool):
        flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
        with quiet_peft():
            pm, backup = self._wrap(lm, train)
        self._pm = pm
        try:
            yield {n: p for n, p in pm.named_parameters() if p.requires_grad}
        finally:
            self._pm = None
            self._detach(pm, lm)
            if backup is not None:
                with torch.no_grad():
                    for name, w in backup.items():
                        lm.model.get_parameter(name).copy_(w)
            for n, p in lm.model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))

    def _wrap(self, lm: LM, train: bool):
        """A PEFT model around the base: a fresh adapter for training, else the fitted one; and any backup."""
        from peft import PeftModel, get_peft_model

        backup = None
        if train:
            cfg = self._peft_config(lm, self._n_steps())
            if str(getattr(cfg, "init_lora_weights", "")).startswith("pissa"):
                backup = self._backup_targets(lm, cfg)
            pm = get_peft_model(lm.model, cfg)
            self._prepare(pm, lm)
            if lm.device.type == "cpu":
                use_fast_dropout(pm)
                lean_lora(pm)
            if backup is not None:
                self._init_dir = _private_dir(self)
                pm.peft_config["default"].init_lora_weights = True  # reloading must not redo the SVD
                pm.save_pretrained(self._init_dir)
        else:
            self._check_fitted()
            pm = PeftModel.from_pretrained(lm.model, str(self.adapter_dir_), is_trainable=False)
        return pm, backup

    def _detach(self, pm, lm: LM) -> None:
        pm.unload()

    @staticmethod
    def _backup_targets(lm: LM, cfg) -> dict[str, torch.Tensor]:
        targets = cfg.target_modules
        targets = {targets} if isinstance(targets, str) else set(targets)
        out = {}
        for name, mod in lm.model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                out[f"{name}.weight"] = mod.weight.detach().clone()
        return out

    def _after_training(self, lm: LM, params) -> None:
        self.adapter_dir_ = _private_dir(self)
        kwargs = {}
        if getattr(self, "_init_dir", None) is not None:
            kwargs["path_initial_model_for_weight_conversion"] = str(self._init_dir)
        self._pm.save_pretrained(str(self.adapter_dir_), **kwargs)
        self._fix_base_path(lm)

    def _fix_base_path(self, lm: LM) -> None:
        """Point ``base_model_name_or_path`` at the model lmtune loaded (a local folder here)."""
        import json

        p = Path(self.adapter_dir_) / "adapter_config.json"
        cfg = json.loads(p.read_text())
        cfg["base_model_name_or_path"] = lm.source
        p.write_text(json.dumps(cfg, indent=2, sort_keys=True))

    def _write_files(self, folder: Path) -> None:
        for f in ADAPTER_FILES:
            shutil.copyfile(Path(self.adapter_dir_) / f, folder / f)

    def _load_files(self, folder: Path) -> None:
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise LmtuneError(f"{folder}: {', '.join(missing)} missing: not a complete {self.method} run")
        self.adapter_dir_ = _private_dir(self)
        for f in ADAPTER_FILES:
            shutil.copyfile(folder / f, Path(self.adapter_dir_) / f)


class LoraClassifier(PeftClassifier):
    """LoRA: trainable low-rank updates B A beside frozen weight matrices (PEFT), with PiSSA and DoRA options.

    Parameters
    ----------
    rank : int
        Rank r of each update B A.
    alpha : float
        Scaling numerator: the update is (alpha / r) B A.
    dropout : float
        Dropout on the LoRA branch's input.
    target : str
        Comma-separated module names to adapt (q_proj,v_proj), or all-linear.
    layers : str or int or None
        Layers to adapt: n (the top n), a-b, or i,j,k; None adapts all. With only top layers adapted, their
        frozen inputs are computed once, not every epoch.
    init : str
        Initialisation: default (B = 0, A random), gaussian, or pissa (principal singular vectors of W).
    dora : bool
        Weight-decomposed LoRA: a trainable magnitude per output feature beside the direction update.
    bayes : str or None
        A posterior over the LoRA parameters: laplace (KFAC Laplace at the trained adapter, linearised
        predictive; lmtune.laplace) or svgd (particles trained together by Stein variational gradient
        descent; lmtune.svgd). None trains one adapter.
    particles : int
        Adapters trained together by SVGD (bayes=svgd).
    prior_precision : float or None
        Precision of the Gaussian prior on every LoRA parameter. None: Laplace chooses it by prior_method;
        SVGD uses 1, applied decoupled from AdamW (lmtune.svgd).
    prior_method : str
        Laplace: how the prior precision is chosen when not given: evidence (maximise the marginal
        likelihood on the training data), val (lowest validation NLL of the predictive on a grid; needs
        validation data), or auto (the default): the evidence, and the validation NLL instead when the
        evidence collapses the posterior onto the MAP and validation data are given (lmtune.laplace).
    svgd_temperature : float
        SVGD: the likelihood is raised to the power 1/svgd_temperature (below 1: a cold posterior).
    predictive : str
        Laplace: class probabilities from the Gaussian over the logits by mc (Monte Carlo) or probit.
    mc_samples : int
        Laplace with predictive mc: logit samples per record (seeded by seed).
    kfac_rank : int
        Laplace: eigenpairs kept of a Kronecker factor wider than 2048 (the others share their mean);
        narrower factors are kept whole.
    kfac_samples : int or None
        Laplace: the curvature pass runs over this many training examples drawn at random (seeded by
        seed), its sums scaled up to the whole set; None uses every example. The pass costs a forward
        and backward per example, about 1.3 to 1.5 epochs of training (which shares the prompt prefix
        across a batch, and the pass cannot), so a sample bounds its time on large training sets.
    ggn_samples : int or None
        Laplace: the most backward passes per batch of the curvature pass. The exact GGN needs one per
        class but one (K - 1); with more classes than ggn_samples + 1 it is estimated from ggn_samples
        Gaussian sketches of each example's softmax Hessian (unbiased, seeded by seed). The default, 2,
        keeps binary and three-class tasks exact; on 16 classes it took the step from 16.9 to 3.7 epochs
        (docs/benchmarks.md, section 8). None: always exact.
    """

    method = "lora"
    # Measured on the built-in reviews (440 examples, about 165 steps, q_proj/v_proj of the top 4 blocks):
    # 1e-3 barely moved the loss in 2 epochs (test accuracy 0.54), 1e-2 reached 0.885 in 3.
    # Measured on the built-in reviews (r=8, q_proj/v_proj, top 4 blocks, 3 epochs): test accuracy 0.885 at
    # 1e-2 against 0.635 at 5e-3 (docs/benchmarks.md, the trade-off report).
    default_lr = 1e-2
    bayes_modes = ("laplace", "svgd")
    options = ("rank", "alpha", "dropout", "target", "layers", "init", "dora", "particles", "prior_precision",
               "prior_method", "svgd_temperature", "predictive", "mc_samples", "kfac_rank", "kfac_samples",
               "ggn_samples")

    def __init__(self, model=DEFAULT_MODEL, task=None, *, rank: int = 8, alpha: float = 16, dropout: float = 0.05,
                 target: str = "q_proj,v_proj", layers=None, init: str = "default", dora: bool = False,
                 bayes: str | None = None, particles: int = 4, prior_precision: float | None = None,
                 prior_method: str = "auto", svgd_temperature: float = 1.0, predictive: str = "mc",
                 mc_samples: int = 1000, kfac_rank: int = 128, kfac_samples: int | None = None,
                 ggn_samples: int | None = 2, **kwargs):
        super().__init__(model, task, **kwargs)
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target = target
        self.layers = layers
        self.init = init
        self.dora = dora
        self.bayes = bayes
        self.particles = particles
        self.prior_precision = prior_precision
        self.prior_method = prior_method
        self.svgd_temperature = svgd_temperature
        self.predictive = predictive
        self.mc_samples = mc_samples
        self.kfac_rank = kfac_rank
        self.kfac_samples = kfac_samples
        self.ggn_samples = ggn_samples

    def _targets(self, lm: LM) -> list[str]:
        """Module names to adapt; all-linear means every linear layer inside the transformer blocks."""
        t = [x.strip() for x in str(self.target).split(",") if x.strip()]
        if not t:
            raise LmtuneError("target: name at least one module (q_proj,v_proj) or all-linear")
        if t == ["all-linear"]:  # spelled out, so that PEFT also accepts it with layers_to_transform
            t = sorted({n.rsplit(".", 1)[-1] for n, m in backbone_of(lm).layers.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        return t

    def _peft_config(self, lm: LM, n_steps: int):
        from peft import LoraConfig

        if self.rank < 1:
            raise LmtuneError(f"rank must be at least 1, got {self.rank}")
        inits = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}
        if self.init not in inits:
            raise LmtuneError(f"init must be one of {', '.join(inits)}, got {self.init!r}")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self._targets(lm), layers_to_transform=parse_layers(self.layers, n_layers(lm)),
                          init_lora_weights=inits[self.init], use_dora=self.dora, bias="none")

    def _frozen_below(self, lm: LM) -> int:
        layers = parse_layers(self.layers, n_layers(lm))
        return min(layers) if layers else 0

    # -- posteriors (bayes="laplace" | "svgd"): lmtune.laplace and lmtune.svgd do the work ------------------

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "bayes": self.bayes}

    def fit(self, data, val=None):
        from lmtune.methods.base import as_dataset

        if self.bayes is None:
            return super().fit(data, val=val)
        from lmtune.laplace import fit_lora_laplace

        self._check_bayes()
        if self.bayes == "laplace" and self.prior_method == "val" and self.prior_precision is None and val is None:
            raise LmtuneError("prior_method='val' chooses the Laplace prior on validation data: give it (--val)")
        ds = as_dataset(data)
        self._kept_lower = None
        self._keep_lower = self.bayes == "laplace"
        try:
            super().fit(ds, val=val)
            if self.bayes == "laplace":
                self.posterior_, self.posterior_info_ = fit_lora_laplace(self, ds, val)
                if self.posterior_info_["prior_at_bound"] and self.posterior_info_["validation_tuning"] is None:
                    import warnings

                    warnings.warn(f"the Laplace evidence rose to its bound (prior precision "
                                  f"{self.posterior_.prior_precision:.3g}): the posterior collapsed onto the MAP "
                                  "and predicts like it; given validation data (--val FILE), prior_method 'auto' "
                                  "(the default) or 'val' chooses the prior on them", stacklevel=2)
            else:
                from lmtune.svgd import svgd_info

                self.posterior_info_ = svgd_info(self)
        finally:
            self._keep_lower, self._kept_lower = False, None
        return self

    def _lower_cache(self, lm: LM, seqs, start: int):
        out = super()._lower_cache(lm, seqs, start)
        if getattr(self, "_keep_lower", False):  # the Laplace pass over the training data reuses it
            self._kept_lower = (seqs, start, out)
        return out

    @contextlib.contextmanager
    def _attach(self, lm: LM, train: bool):
        with super()._attach(lm, train) as params:
            if not (train and self.bayes == "svgd"):
                yield params
                return
            from lmtune.svgd import lora_particles

            self._particles = lora_particles(self, params)
            try:
                yield self._particles.named_parameters()
            finally:
                self._particles = None

    def _classification_objective(self, data, val):
        obj = super()._classification_objective(data, val)
        if self.bayes == "svgd":
            from lmtune.svgd import svgd_objective

            svgd_objective(self, obj)
        return obj

    def _clip_groups(self):
        ps = getattr(self, "_particles", None)
        return ps.clip_groups() if ps is not None else super()._clip_groups()

    def _after_update(self, step: int, lr: float) -> None:
        if getattr(self, "_particles", None) is not None:
            from lmtune.svgd import svgd_prior_step

            svgd_prior_step(self, lr)

    def _logits_of(self, lm: LM, seqs, label_ids):
        ps = getattr(self, "_particles", None)
        if ps is None:
            return super()._logits_of(lm, seqs, label_ids)
        import numpy as np

        from lmtune.methods.base import softmax

        probs = 0.0
        for i in range(len(ps)):  # the ensemble is what validation scores
            with ps.swap(i):
                probs = probs + softmax(super()._logits_of(lm, seqs, label_ids))
        return np.log(np.maximum(probs / len(ps), 1e-300))

    def _after_training(self, lm: LM, params) -> None:
        ps = getattr(self, "_particles", None)
        if ps is None:
            return super()._after_training(lm, params)
        dirs = []
        for i in range(len(ps)):  # one plain PEFT adapter folder per particle
            with ps.swap(i):
                super()._after_training(lm, params)
            dirs.append(self.adapter_dir_)
        self.particle_dirs_ = dirs
        self.adapter_dir_ = dirs[0]
        self._svgd_bandwidth = ps.last_bandwidth

    def label_logits(self, data, labeled: bool = False, base: bool = False):
        """Adapted (N, K) label logits; with a posterior, the log of the predictive probabilities (so
        ``softmax`` gives them back) and the per-record uncertainty in ``last_uncertainty_``."""
        if self.bayes is None:
            return super().label_logits(data, labeled=labeled, base=base)
        from lmtune.laplace import predict_lora_laplace
        from lmtune.svgd import predict_lora_svgd

        self._check_fitted()
        return (predict_lora_laplace if self.bayes == "laplace" else predict_lora_svgd)(self, data, labeled, base)

    def uncertainty(self, data):
        """Predictions and per-record uncertainty (the hook of :func:`lmtune.evaluate.predict_records`).

        Returns ``(logits (N, K), extras, dataset)``: with a posterior, ``extras`` holds ``"entropy"`` of
        the predictive distribution and ``"logit_std"``, the posterior standard deviation of the centred
        label logits (N,) each; empty without one.
        """
        logits, _, _, ds = self.label_logits(data)
        if self.bayes is None:
            return logits, {}, ds
        return logits, {k: self.last_uncertainty_[k] for k in ("entropy", "logit_std")}, ds

    def card(self) -> dict:
        card = super().card()
        if self.bayes is not None:
            card["posterior"] = dict(self.posterior_info_)
        return card

    def _write_files(self, folder: Path) -> None:
        """The adapter files (the MAP for laplace, beside ``laplace.safetensors``; ``particles/<i>/`` for svgd)."""
        from lmtune.laplace import POSTERIOR_FILE
        from lmtune.svgd import write_particles

        if self.bayes == "svgd":
            return write_particles(self, folder)
        super()._write_files(folder)
        if self.bayes == "laplace":
            self.posterior_.save(folder / POSTERIOR_FILE)

    def _load_files(self, folder: Path) -> None:
        from lmtune.laplace import POSTERIOR_FILE, KFACPosterior
        from lmtune.svgd import load_particles

        self._check_bayes()
        if self.bayes == "svgd":
            return load_particles(self, folder)
        super()._load_files(folder)
        if self.bayes == "laplace":
            if not (folder / POSTERIOR_FILE).is_file():
                raise LmtuneError(f"{folder}: {POSTERIOR_FILE} missing: not a complete lora --bayes laplace run")
            self.posterior_ = KFACPosterior.load(folder / POSTERIOR_FILE)

    def _check_bayes(self) -> None:
        """The posterior options, checked before any work."""
        from lmtune.instruct import GenerationTask
        from lmtune.laplace import PREDICTIVES, PRIOR_METHODS

        if self.bayes is None:
            return
        if self.bayes not in self.bayes_modes:
            raise LmtuneError(f"bayes must be one of {', '.join(self.bayes_modes)} or None, got {self.bayes!r}")
        if isinstance(self.task, GenerationTask):
            raise LmtuneError("posteriors over LoRA (bayes) are for classification tasks, not generation")
        if self.dora or self.init == "pissa":
            raise LmtuneError("bayes works on plain LoRA factors A and B: not with dora or init=pissa")
        checks = [("particles", isinstance(self.particles, int) and self.particles >= 1, "an integer >= 1"),
                  ("prior_precision", self.prior_precision is None or self.prior_precision > 0,
                   "a positive number or None"),
                  ("prior_method", self.prior_method in PRIOR_METHODS, " or ".join(PRIOR_METHODS)),
                  ("svgd_temperature", self.svgd_temperature > 0, "a positive number"),
                  ("predictive", self.predictive in PREDICTIVES, " or ".join(PREDICTIVES)),
                  ("mc_samples", isinstance(self.mc_samples, int) and self.mc_samples >= 1, "an integer >= 1"),
                  ("kfac_rank", isinstance(self.kfac_rank, int) and self.kfac_rank >= 1, "an integer >= 1"),
                  ("kfac_samples", self.kfac_samples is None
                   or (isinstance(self.kfac_samples, int) and self.kfac_samples >= 1), "an integer >= 1 or None"),
                  ("ggn_samples", self.ggn_samples is None
                   or (isinstance(self.ggn_samples, int) and self.ggn_samples >= 1), "an integer >= 1 or None")]
        for name, ok, expected in checks:
            if not ok:
                raise LmtuneError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_card(cls, card: dict, folder: Path, model, **kwargs):
        est = super().from_card(card, folder, model, **kwargs)
        if est.bayes is not None:
            est.posterior_info_ = card.get("posterior", {})
        return est


class AdaLoraClassifier(PeftClassifier):
    """AdaLoRA: SVD-form low-rank updates whose ranks are reallocated during training by importance (PEFT).

    Parameters
    ----------
    init_rank : int
        Starting rank of every update.
    target_rank : int
        Average rank left after allocation (the budget).
    alpha : float
        Scaling numerator of the updates.
    dropout : float
        Dropout on the adapter branch's input.
    target : str
        Comma-separated module names to adapt.
    tinit : float
        Share of the optimizer steps before rank pruning begins.
    tfinal : float
        Share of the optimizer steps, at the end, trained with the final ranks fixed.
    orth_reg : float
        Weight of the penalty keeping the singular-vector factors orthogonal.

    Notes
    -----
    The allocator's importance averages live in PEFT's rank allocator, outside the training checkpoint, so a
    resumed AdaLoRA run continues with fresh averages: close to, but not bit-identical with, an
    uninterrupted run (every other method resumes exactly).
    """

    method = "adalora"
    default_lr = 5e-3
    options = ("init_rank", "target_rank", "alpha", "dropout", "target", "tinit", "tfinal", "orth_reg")

    def __init__(self, model=DEFAULT_MODEL, task=None, *, init_rank: int = 12, target_rank: int = 4, alpha: float = 16,
                 dropout: float = 0.05, target: str = "q_proj,v_proj", tinit: float = 0.2, tfinal: float = 0.3,
                 orth_reg: float = 0.5, **kwargs):
        super().__init__(model, task, **kwargs)
        self.init_rank = init_rank
        self.target_rank = target_rank
        self.alpha = alpha
        self.dropout = dropout
        self.target = target
        self.tinit = tinit
        self.tfinal = tfinal
        self.orth_reg = orth_reg

    def _peft_config(self, lm: LM, n_steps: int):
        from peft import AdaLoraConfig

        if not 1 <= self.target_rank <= self.init_rank:
            raise LmtuneError(f"need 1 <= target_rank <= init_rank, got {self.target_rank} and {self.init_rank}")
        tinit, tfinal = int(self.tinit * n_steps), int(self.tfinal * n_steps)
        if tinit + tfinal >= n_steps:
            raise LmtuneError(f"AdaLoRA needs steps left for rank allocation: {n_steps} optimizer steps, "
                              f"tinit {tinit} + tfinal {tfinal}; train longer or lower tinit/tfinal")
        self._total_step = n_steps
        return AdaLoraConfig(init_r=self.init_rank, target_r=self.target_rank, lora_alpha=self.alpha,
                             lora_dropout=self.dropout, target_modules=LoraClassifier._targets(self, lm),
                             total_step=n_steps, tinit=tinit, tfinal=tfinal, deltaT=1,
                             orth_reg_weight=self.orth_reg)

    def _regularizer(self, n: int):
        if self._pm is None or not self.orth_reg:
            return 0.0
        reg, count = 0.0, 0
        for name, p in self._pm.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                cov = p @ p.T if "lora_A" in name else p.T @ p
                reg = reg + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
                count += 1
        return self.orth_reg * reg / max(count, 1) * n

    def _after_update(self, step: int, lr: float) -> None:
        if self._pm is not None:
            self._pm.base_model.update_and_allocate(step)

    def rank_pattern(self) -> dict[str, int]:
        """Ranks left to each adapted module after allocation (from the saved adapter)."""
        import json

        self._check_fitted()
        cfg = json.loads((Path(self.adapter_dir_) / "adapter_config.json").read_text())
        pattern = cfg.get("rank_pattern") or {}
        return {k: int(sum(v)) if isinstance(v, list) else int(v) for k, v in pattern.items()}


class PromptTuningClassifier(PeftClassifier):
    """Prompt tuning: trainable virtual-token embeddings prepended to every prompt (PEFT).

    Parameters
    ----------
    virtual_tokens : int
        Number of trainable embeddings prepended.
    init_text : str or None
        Initialise the virtual tokens from this text's token embeddings (tiled); None draws them from the
        vocabulary's embeddings at random.
    """

    method = "prompt-tuning"
    default_lr = 3e-2
    options = ("virtual_tokens", "init_text")

    def __init__(self, model=DEFAULT_MODEL, task=None, *, virtual_tokens: int = 20,
                 init_text: str | None = "Classify the text and answer with one word.", **kwargs):
        super().__init__(model, task, **kwargs)
        self.virtual_tokens = virtual_tokens
        self.init_text = init_text

    def _peft_config(self, lm: LM, n_steps: int):
        from peft import PromptTuningConfig, TaskType

        if self.virtual_tokens < 1:
            raise LmtuneError(f"virtual_tokens must be at least 1, got {self.virtual_tokens}")
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.virtual_tokens)

    def _prepare(self, pm, lm: LM) -> None:
        emb = backbone_of(lm).get_input_embeddings().weight
        if self.init_text:
            ids = lm.tokenizer(self.init_text, add_special_tokens=False)["input_ids"] or [0]
        else:
            ids = torch.randint(0, emb.shape[0], (self.virtual_tokens,)).tolist()
        ids = (ids * math.ceil(self.virtual_tokens / len(ids)))[: self.virtual_tokens]
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.copy_(emb[torch.tensor(ids)])

    def _virtual_prefix(self, batch: int):
        pm = getattr(self, "_pm", None)
        return pm.get_prompt(batch_size=batch) if pm is not None else None

    def _detach(self, pm, lm: LM) -> None:
        pass  # prompt learning wraps the model without changing its modules
