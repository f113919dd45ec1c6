"""Gradient-trained label-token classifiers: the base every parameter-efficient method shares.

A tuned method changes some part of the model (LoRA factors, virtual tokens, adapters, a few layers, all
of it) and trains that part with the same objective the closed-form head solves exactly: cross-entropy
of the K label tokens' logits at the prompt's last position,

    loss = -log softmax(h_T A[:, labels])_y          h_T: final hidden state at the last prompt token

so the full-vocabulary logits of every position are never formed (the output embedding is sliced to
its K label rows, as in :mod:`lmtune.features`).

Design
------
* **The base model is shared and never left changed.** A method keeps what it learned apart from the
  model and *attaches* it only for a forward pass (:meth:`TunedClassifier.attached`): PEFT adapters are
  injected and unloaded again, hand-written methods swap their tensors in and back out. Several runs can
  therefore use one loaded base, the zero-shot logits stay available for the flip analysis, and the
  on-disk feature cache (keyed by the base model's fingerprint) is never poisoned by adapted weights.
* **One training loop** (:func:`lmtune.training.train`) for every method: the method only supplies its
  trainable parameters and this module's loss over example indices.
* **Frozen lower layers are computed once.** When a method trains nothing below layer ``k`` (last-layers;
  LoRA or adapters restricted to the top layers), the hidden states entering layer ``k`` are computed once
  for the training set, under ``no_grad``, and every epoch runs only layers ``k..L``. This is exact: those
  states do not depend on anything being trained. It is done by running the backbone with its layer list
  cut (:func:`layer_range`), so the model's own mask and rotary code stay in charge; it is used only for
  model types whose backbone passes ``inputs_embeds`` through unchanged (no embedding scaling).
* **The prompt prefix runs once per batch.** Every prompt of a task begins with the same tokens (the chat
  template's system turn, the instruction before ``{text}``): about 40% of the tokens of the built-in
  task. :meth:`TunedClassifier._forward` runs the batch's common token prefix (and prompt tuning's
  virtual tokens) once, with gradients: in the batch's padding positions (widened when they are too few),
  from where every row's attention reads its keys and values, or as a separate pass of one whose keys and
  values are broadcast over the batch (:func:`lmtune.features.continue_shared_head`). Exact in value and gradient, since the
  prefix's activations are the same in every row; with dropout on, the rows share the prefix's
  dropout mask. It saves the backbone's compute and stored activations for ``(B - 1) * P`` tokens per
  batch, also under activation checkpointing (:func:`lmtune.features.continue_shared_head`). Off for
  the Laplace factors, which need every example's own activations.
* Batches are grouped by length and right-padded; the logits are read at each row's last real token.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
from transformers import DynamicCache

from lmtune.errors import LmtuneError
from lmtune.features import _batch_cache, continue_shared_head, extract, rows_after_head, shared_prefix_length
from lmtune.last_layer import final_layer_at
from lmtune.lean_blocks import lean_blocks
from lmtune.metrics import classification_report
from lmtune.methods.base import LabelTokenClassifier, as_dataset, softmax
from lmtune.models import DEFAULT_MODEL, LM
from lmtune.profiling import PeakMemory
from lmtune.runs import write_run

# Backbones whose forward uses inputs_embeds as given (Gemma, for one, scales them by sqrt(d)).
REUSE_LOWER_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo", "olmo2", "granite"}
LOWER_CACHE_LIMIT_BYTES = 4 << 30  # above this, recompute the frozen layers instead of storing them


def backbone_of(lm: LM):
    """The decoder stack (embeddings, layers, final norm) of a causal LM."""
    return lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model.base_model


def n_layers(lm: LM) -> int:
    return len(backbone_of(lm).layers)


@contextlib.contextmanager
def layer_range(lm: LM, start: int, stop: int | None = None, final_norm: bool = True):
    """Run only layers ``start:stop`` of the backbone (and the final norm when ``final_norm``)."""
    bb = backbone_of(lm)
    layers, norm = bb.layers, bb.norm
    bb.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        bb.norm = torch.nn.Identity()
    try:
        yield bb
    finally:
        bb.layers, bb.norm = layers, norm


def pad_batch(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), attention mask (B, T) and lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max())
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device), lengths.to(device)


class TunedClassifier(LabelTokenClassifier):
    """Base of the gradient-trained methods; subclasses say what is trained and how it attaches.

    Parameters
    ----------
    model : LM or str
        A loaded :class:`lmtune.models.LM` or a name for :func:`lmtune.load_model`.
    task : ClassificationTask
    epochs : int
        Passes over the training data.
    lr : float or None
        Peak learning rate of AdamW; None takes the method's default.
    batch_size : int
        Examples per optimizer step (across gradient accumulation and processes); also the batch of
        inference passes.
    grad_accum : int
        Micro-batches per optimizer step: the same gradient as one big batch, in less memory.
    max_batch_tokens : int or None
        Memory budget of a forward pass in padded prompt tokens (examples x longest length): a batch
        above it runs as micro-batches that fit, with the same gradient. Peak memory then follows the
        budget instead of the longest batch of the data. None: no budget.
    weight_decay : float
        AdamW weight decay (not applied to biases and norm weights).
    warmup : float
        Linear warmup: a fraction of the optimizer steps when below 1, else a number of steps.
    schedule : str
        Learning-rate decay after warmup: cosine, linear or constant.
    clip : float or None
        Largest global gradient norm; 0 or None turns clipping off.
    patience : int or None
        Stop after this many epochs without a better validation score (needs validation data).
    val : Dataset, str or None
        Validation data, scored each epoch; the best epoch's parameters are kept.
    val_metric : str
        What validation maximises: nll (the negative log-likelihood, lower is better) or accuracy.
    seed : int
        Seeds initialisation, data order and dropout.
    max_steps : int or None
        Stop after this many optimizer steps.
    gradient_checkpointing : bool
        Recompute activations in the backward pass: less memory, about a third more time.
    checkpoint_dir : str or None
        Folder for resumable training checkpoints.
    resume : bool
        Continue from the checkpoint in checkpoint_dir when there is one.
    reuse_lower : bool
        Compute the frozen lower layers' activations once instead of every epoch (exact; uses memory).
    share_prefix : bool
        Run each batch's common prompt prefix once, with gradients, and broadcast its keys/values
        (exact in value and gradient; see the module docstring).
    pack : bool
        Generation tasks: put several short records in one row, each attending only to itself.
    progress : bool or None
        Progress bars; None shows them only on a terminal.
    cache : bool
        Use the on-disk feature cache for the base model's (zero-shot) logits.
    """

    default_lr: ClassVar[float] = 1e-4
    # Constructor parameters that are method options (the CLI offers them as --flags).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: "LM | str" = DEFAULT_MODEL, task=None, *, epochs: int = 3, lr: float | None = None,
                 batch_size: int = 8, grad_accum: int = 1, max_batch_tokens: int | None = None,
                 weight_decay: float = 0.0, warmup: float = 0.06,
                 schedule: str = "cosine", clip: float | None = 1.0, patience: int | None = None, val=None,
                 val_metric: str = "nll", seed: int = 0, max_steps: int | None = None,
                 gradient_checkpointing: bool = False, checkpoint_dir: str | None = None, resume: bool = False,
                 reuse_lower: bool = True, share_prefix: bool = True, pack: bool = False,
                 progress: bool | None = None, cache: bool = True):
        super().__init__(model, task, batch_size=batch_size, progress=progress, cache=cache)
        self.epochs = epochs
        self.lr = lr
        self.grad_accum = grad_accum
        self.max_batch_tokens = max_batch_tokens
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.schedule = schedule
        self.clip = clip
        self.patience = patience
        self.val = val
        self.val_metric = val_metric
        self.seed = seed
        self.max_steps = max_steps
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.reuse_lower = reuse_lower
        self.share_prefix = share_prefix
        self.pack = pack

    # -- what a subclass provides ---------------------------------------------------------------------

    def _init_state(self, lm: LM) -> None:
        """Create the untrained learned state (``self.*_``), seeded."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _attach(self, lm: LM, train: bool) -> Iterator[dict[str, torch.nn.Parameter]]:
        """Put the learned state into the model; yield the trainable parameters; undo on exit."""
        raise NotImplementedError
        yield {}

    def _after_training(self, lm: LM, params: dict[str, torch.nn.Parameter]) -> None:
        """Keep the trained values (called while still attached)."""

    def _frozen_below(self, lm: LM) -> int:
        """Index of the lowest layer whose output depends on trained parameters (0: the embeddings do)."""
        return 0

    def _virtual_prefix(self, batch: int) -> torch.Tensor | None:
        """(B, P, d) embeddings prepended to every prompt (prompt tuning), or None."""
        return None

    def hyperparameters(self) -> dict:
        """The method's own options, for the run card."""
        return {name: getattr(self, name) for name in self.options}

    # -- attaching ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self, train: bool = False):
        """The base model with this method's learned state in it, for the duration of the block."""
        lm = self.lm
        with self._attach(lm, train) as params:
            yield params

    # -- forward --------------------------------------------------------------------------------------

    def _forward(self, lm: LM, seqs: list[list[int]], label_ids: torch.Tensor,
                 lower: list[torch.Tensor] | None = None, start: int = 0,
                 share_prefix: bool | None = None, last_only: bool = True) -> torch.Tensor:
        """(B, K) label logits for token sequences; from cached layer-``start`` inputs when ``lower``.

        With ``share_prefix`` (default: the estimator's option) the batch's common token prefix, and
        prompt tuning's virtual tokens, run once as a batch of one and their keys/values are broadcast
        over the batch (see the module docstring); ``False`` runs every row in full, which per-example
        quantities need (the Laplace factors). ``last_only`` computes the final layer only at each row's
        last token, where it is read (:mod:`lmtune.last_layer`; exact)."""
        device = lm.device
        bb = backbone_of(lm)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        B = len(seqs)
        share = self.share_prefix if share_prefix is None else share_prefix
        P = shared_prefix_length(seqs) if share else 0
        ids, mask, lengths = pad_batch([s[P:] for s in seqs] if P else seqs, pad, device)
        read = (lengths - 1).to(device) if last_only else None  # the final layer runs only where it is read
        if lower is not None:
            T = ids.shape[1]
            emb = torch.zeros((B, T, lower[0].shape[-1]), dtype=lower[0].dtype, device=device)
            for r, h in enumerate(lower):
                emb[r, :h.shape[0] - P] = h[P:].to(device)
            with layer_range(lm, start) as top, final_layer_at(top, read), lean_blocks(bb):
                if P:  # the rows' states at the common prefix are the same: row 0's serve as the head
                    h = continue_shared_head(top, lower[0][:P].to(device)[None], emb, mask)
                else:
                    h = top(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state
        else:
            embed = bb.get_input_embeddings()
            emb = embed(ids)
            virtual = self._virtual_prefix(1)
            head = [virtual.to(emb.dtype)] if virtual is not None else []
            if P:
                head.append(embed(torch.tensor([seqs[0][:P]], device=device)))
            head = torch.cat(head, dim=1) if head else None
            if read is not None and head is not None and not share:  # rows_after_head puts it before every row
                read = read + head.shape[1]
            with final_layer_at(bb, read), lean_blocks(bb):
                h = rows_after_head(bb, head, emb, mask, share)
        z = h[torch.arange(B, device=device), lengths - 1]
        A = lm.model.get_output_embeddings()
        logits = z @ A.weight[label_ids].T
        if getattr(A, "bias", None) is not None:
            logits = logits + A.bias[label_ids]
        return logits.float()

    @torch.no_grad()
    def _lower_cache(self, lm: LM, seqs: list[list[int]], start: int) -> list[torch.Tensor] | None:
        """Hidden states entering layer ``start`` for every sequence (each (T_i, d)), or None if unsuitable."""
        if start <= 0 or not self.reuse_lower or self._virtual_prefix(1) is not None:
            return None
        if getattr(lm.model.config, "model_type", "") not in REUSE_LOWER_MODEL_TYPES:
            return None
        bytes_needed = sum(len(s) for s in seqs) * lm.hidden_size * 4
        if bytes_needed > LOWER_CACHE_LIMIT_BYTES:
            return None
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        # The prompts' common token prefix runs once, as in feature extraction; its hidden states are
        # shared by every example and its keys/values serve every batch (exact: causal attention).
        P = shared_prefix_length(seqs)
        bs = max(self.batch_size, 16)
        was_training = lm.model.training
        lm.model.eval()
        try:
            with layer_range(lm, 0, start, final_norm=False) as low:
                if P:
                    cache = DynamicCache(config=low.config)
                    prefix = torch.tensor([seqs[0][:P]], device=lm.device)
                    head = low(input_ids=prefix, past_key_values=cache, use_cache=True).last_hidden_state[0].cpu()
                    kv = [(layer.keys, layer.values) for layer in cache.layers[:start]]
                for b in range(0, len(order), bs):
                    idx = order[b:b + bs]
                    ids, mask, lengths = pad_batch([seqs[i][P:] for i in idx], pad, lm.device)
                    kwargs = {"use_cache": False}
                    if P:
                        B, T = ids.shape
                        mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=mask.device), mask], dim=1)
                        kwargs = {"past_key_values": _batch_cache(low, kv, B), "use_cache": True,
                                  "position_ids": (P + torch.arange(T, device=lm.device)).expand(B, -1)}
                    h = low(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state.cpu()
                    for r, i in enumerate(idx):
                        part = h[r, :int(lengths[r])]
                        out[i] = torch.cat([head, part]) if P else part.clone()
        finally:
            lm.model.train(was_training)
        return out

    def _logits_of(self, lm: LM, seqs: list[list[int]], label_ids: torch.Tensor) -> np.ndarray:
        """Adapted (N, K) label logits, in eval mode, batched by length."""
        out = np.empty((len(seqs), len(label_ids)), dtype=np.float64)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        bs = max(self.batch_size, 16)
        was_training = lm.model.training
        lm.model.eval()
        try:
            with torch.inference_mode():
                for b in range(0, len(order), bs):
                    idx = order[b:b + bs]
                    out[idx] = self._forward(lm, [seqs[i] for i in idx], label_ids).cpu().numpy()
        finally:
            lm.model.train(was_training)
        return out

    # -- fitting --------------------------------------------------------------------------------------

    def train_config(self, n_examples: int):
        from lmtune.training import TrainConfig

        return TrainConfig(epochs=self.epochs, lr=self.lr if self.lr is not None else self.default_lr,
                           weight_decay=self.weight_decay, warmup=self.warmup, schedule=self.schedule,
                           batch_size=self.batch_size, grad_accum=self.grad_accum,
                           max_batch_tokens=self.max_batch_tokens, clip=self.clip or None,
                           patience=self.patience, seed=self.seed, max_steps=self.max_steps,
                           checkpoint_dir=self.checkpoint_dir)

    def fit(self, data, val=None) -> "TunedClassifier":
        """Train on labeled ``data``; ``val`` (or the ``val`` parameter) picks the best epoch.

        For a :class:`~lmtune.instruct.GenerationTask`, ``data`` may also be a
        :class:`~lmtune.mixture.Mixture` (several datasets with sampling weights) or its spec string."""
        from lmtune.instruct import GenerationTask

        if self.val_metric not in ("nll", "accuracy"):
            raise LmtuneError(f"val_metric must be nll or accuracy, got {self.val_metric!r}")
        val = val if val is not None else self.val
        if isinstance(self.task, GenerationTask):
            objective = self._generation_objective(data, val)
        else:
            objective = self._classification_objective(data, val)
        return self._train(objective)

    def _classification_objective(self, data, val) -> "_Objective":
        ds = as_dataset(data)
        task = self._check_task()
        lm = self.lm
        tok = lm.tokenizer
        label_ids = torch.tensor(task.label_token_ids(tok), device=lm.device)
        enc = task.encode(tok, ds, labeled=True)
        seqs, y = enc.input_ids, torch.as_tensor(enc.y, device=lm.device)
        vseqs = vy = None
        if val is not None:
            venc = task.encode(tok, as_dataset(val), labeled=True)
            vseqs, vy = venc.input_ids, venc.y

        def batch_loss(indices, lower, start):
            batch = [seqs[i] for i in indices]
            if lower is not None:
                logits = self._forward(lm, batch, label_ids, [lower[i] for i in indices], start)
            else:
                logits = self._forward(lm, batch, label_ids)
            return torch.nn.functional.cross_entropy(logits, y[indices], reduction="sum")

        def val_fn():
            logits = self._logits_of(lm, vseqs, label_ids)
            rep = classification_report(vy, softmax(logits), task.labels)
            return -rep["nll"] if self.val_metric == "nll" else rep["accuracy"]

        return _Objective(seqs, list(range(len(seqs))), batch_loss, val_fn if vseqs is not None else None,
                          {"data_sha256": ds.content_hash(), "truncated_prompts": enc.n_truncated,
                           "n_val": len(vseqs) if vseqs is not None else 0})

    def _generation_objective(self, data, val) -> "_Objective":
        from lmtune.lm_loss import PACKABLE_MODEL_TYPES
        from lmtune.mixture import as_mixture

        if self.val_metric != "nll":
            raise LmtuneError("generation tasks validate by the completion NLL: use val_metric='nll'")
        task = self.task
        lm = self.lm
        tok = lm.tokenizer
        mix = as_mixture(data)
        seqs = mix.encode(task, tok)
        order = mix.order(self.seed)
        tasks = [s.task for s in seqs]
        if self.pack and (self._virtual_prefix(1) is not None
                          or getattr(lm.model.config, "model_type", "") not in PACKABLE_MODEL_TYPES):
            raise LmtuneError(f"--pack is not available for {self.method} on a "
                              f"{getattr(lm.model.config, 'model_type', '?')} model: records could attend to each "
                              "other; train without packing")
        ids = [s.ids for s in seqs]
        last_loss = np.full(len(seqs), np.nan)  # each record's loss when last seen: per-task training loss

        def batch_loss(indices, lower, start):
            items = [order[i] for i in indices]
            losses = self._completion_losses(lm, [ids[j] for j in items], [seqs[j].targets for j in items],
                                             [lower[j] for j in items] if lower is not None else None, start)
            last_loss[items] = losses.detach().cpu().numpy()
            return losses.sum()

        vseqs = None
        if val is not None:
            vseqs = as_mixture(val).encode(task, tok)

        def val_fn():
            return -float(np.mean(self._sequence_losses(lm, vseqs)))

        def extras():
            out = {"per_task_train_loss": _per_task(tasks, last_loss), "mixture": mix.describe(order)}
            if vseqs is not None:
                out["per_task_val_loss"] = _per_task([s.task for s in vseqs], self._sequence_losses(lm, vseqs))
            return out

        info = {"data_sha256": mix.content_hash(), "n_records": len(seqs), "n_val": len(vseqs) if vseqs else 0,
                "target_tokens": int(sum(s.n_targets for s in seqs)), "packed": bool(self.pack)}
        return _Objective(ids, order, batch_loss, val_fn if vseqs is not None else None, info, extras)

    def _train(self, obj: "_Objective") -> "TunedClassifier":
        """The shared fitting core: attach, cache frozen lower layers, run the training loop, keep the result."""
        from lmtune.training import train

        lm = self.lm
        n = len(obj.order)
        self._n_train = n  # examples per epoch (AdaLoRA's schedule needs the step count up front)
        torch.manual_seed(self.seed)
        self._init_state(lm)
        cfg = self.train_config(n)
        t0 = time.perf_counter()
        was_training = lm.model.training
        gc_was = self.gradient_checkpointing and getattr(lm.model, "is_activation_checkpointing", False)
        with PeakMemory() as mem, self._attach(lm, train=True) as params:
            start = self._frozen_below(lm)
            lower = self._lower_cache(lm, obj.seqs, start)
            lower_seconds = time.perf_counter() - t0
            if self.gradient_checkpointing and lower is None:
                _checkpointing(lm.model, True)
            lm.model.train()

            def loss_fn(indices):
                loss = obj.batch_loss(indices, lower, start)
                return loss + self._regularizer(len(indices)), sum(len(obj.seqs[obj.order[i]]) for i in indices)

            try:
                result = train(params, loss_fn, n, cfg, lengths=[len(obj.seqs[j]) for j in obj.order],
                               val_fn=obj.val_fn, resume=self.resume, progress=self.progress, desc=self.method,
                               after_update=self._after_update, clip_groups=self._clip_groups())
            finally:
                lm.model.train(was_training)
                if self.gradient_checkpointing and not gc_was:
                    _checkpointing(lm.model, False)
            extras = obj.extras() if obj.extras is not None else {}
            self._after_training(lm, params)
            n_trainable = sum(p.numel() for p in params.values())
        n_total = sum(p.numel() for p in lm.model.parameters())
        self.train_result_ = result
        self.fit_info_ = {"n_train": n, **obj.info,
                          "trainable_params": int(n_trainable), "base_params": int(n_total),
                          "trainable_share": n_trainable / n_total, "train_seconds": time.perf_counter() - t0,
                          "lower_cache_seconds": lower_seconds if lower is not None else None,
                          "reused_lower_layers": start if lower is not None else 0,
                          "peak_rss_bytes": mem.peak_rss_bytes, "rss_at_start_bytes": mem.start_rss_bytes,
                          "cuda_peak_bytes": mem.cuda_peak_bytes,
                          "train": result.to_dict(), "config": cfg.to_dict(), **extras}
        return self

    # -- the completion loss --------------------------------------------------------------------------

    def _completion_losses(self, lm: LM, ids: list[list[int]], targets: list[list[bool]],
                           lower: list[torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        """(B,) mean NLL of each sequence's target tokens, with this method's virtual tokens if any."""
        from lmtune.lm_loss import completion_losses

        return completion_losses(lm, ids, targets, pack=bool(self.pack), lower=lower, start=start,
                                 prefix=self._virtual_prefix, share_prefix=self.share_prefix)

    def _sequence_losses(self, lm: LM, seqs) -> np.ndarray:
        from lmtune.lm_loss import sequence_losses

        return sequence_losses(lm, seqs, batch_size=max(self.batch_size, 8), prefix=self._virtual_prefix,
                               share_prefix=self.share_prefix)

    def completion_nll(self, data) -> dict:
        """Mean completion NLL of ``data`` under the adapted model, overall and per task."""
        from lmtune.mixture import as_mixture

        seqs = as_mixture(data).encode(self.task, self.lm.tokenizer)
        with self.attached():
            losses = self._sequence_losses(self.lm, seqs)
        return {"nll": float(losses.mean()), "per_task": _per_task([s.task for s in seqs], losses), "n": len(seqs)}

    def _regularizer(self, n: int) -> torch.Tensor | float:
        """Extra loss per optimizer step, scaled by the micro-batch's share ``n`` (AdaLoRA's orthogonality)."""
        return 0.0

    def _clip_groups(self) -> list[list[str]] | None:
        """Names of the trainable parameters clipped together, group by group (None: all together)."""
        return None

    def _after_update(self, step: int, lr: float) -> None:
        """Called after every optimizer update, gradients still present (AdaLoRA's rank allocation)."""

    # -- predicting -----------------------------------------------------------------------------------

    def _check_fitted(self):
        if not hasattr(self, "fit_info_"):
            raise LmtuneError(f"this {self.method} estimator is not fitted: call fit() or load a run")

    def label_logits(self, data, labeled: bool = False, base: bool = False):
        """Adapted (N, K) label logits, the base model's (when ``base``), the class indices (when
        ``labeled``) and the dataset."""
        self._check_fitted()
        ds = as_dataset(data)
        task = self._check_task()
        lm = self.lm
        label_ids = torch.tensor(task.label_token_ids(lm.tokenizer), device=lm.device)
        enc = task.encode(lm.tokenizer, ds, labeled=labeled)
        t0 = time.perf_counter()
        with self.attached():
            if self._virtual_prefix(1) is None:
                # The adapted model is a model like any other: the fast extraction path (shared prefix
                # computed once, length-sorted batches) applies unchanged, without the disk cache.
                logits = extract(lm, enc.input_ids, label_ids.tolist(), batch_size=max(self.batch_size, 16),
                                 progress=self.progress, desc=f"{self.method}: {ds.path}").L.astype(np.float64)
            else:
                logits = self._logits_of(lm, enc.input_ids, label_ids)
        self.last_predict_seconds_ = time.perf_counter() - t0
        base_logits = None
        if base:
            feats, _, _ = self.features(ds)
            base_logits = np.asarray(feats.L, dtype=np.float64)
        return logits, base_logits, enc.y, ds

    # -- saving ---------------------------------------------------------------------------------------

    def card(self) -> dict:
        self._check_fitted()
        return {**self.base_card(), "hyperparameters": self.hyperparameters(), "training": dict(self.fit_info_)}

    def _write_files(self, folder: Path) -> None:
        """Write the learned state into the run folder being assembled."""
        raise NotImplementedError

    def _load_files(self, folder: Path) -> None:
        """Read the learned state back from a run folder."""
        raise NotImplementedError

    def save(self, path) -> Path:
        """Write the run folder: ``card.json`` and the method's files (see each method)."""
        return write_run(path, self.card(), self._write_files)

    @classmethod
    def from_card(cls, card: dict, folder: Path, model, **kwargs) -> "TunedClassifier":
        from lmtune.instruct import task_from_dict

        est = cls(model, task_from_dict(card["task"]), **card.get("hyperparameters", {}), **kwargs)
        est._load_files(Path(folder))
        est.fit_info_ = card.get("training", {})
        return est


def _checkpointing(model, on: bool) -> None:
    """Switch activation (gradient) checkpointing on or off, by transformers 5's name where it exists."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if on:
        getattr(model, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_disable")()


class _Objective:
    """What one training run optimises: token sequences (for the lower-layer cache and lengths), the map
    from training-example index to sequence (a mixture repeats or skips records), the summed loss of a
    batch, the validation score, and what goes into the card."""

    def __init__(self, seqs, order, batch_loss, val_fn, info, extras=None):
        self.seqs, self.order, self.batch_loss, self.val_fn, self.info, self.extras = (
            seqs, order, batch_loss, val_fn, info, extras)


def _per_task(tasks: list[str], losses) -> dict[str, float]:
    """Mean loss per task tag (records never seen, NaN, are left out)."""
    losses = np.asarray(losses, dtype=np.float64)
    out = {}
    for t in sorted(set(tasks)):
        v = losses[[i for i, x in enumerate(tasks) if x == t]]
        v = v[~np.isnan(v)]
        if len(v):
            out[t or "default"] = float(v.mean())
    return out
