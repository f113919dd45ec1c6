r"""The one training loop every gradient method uses: AdamW over named parameters and a loss over indices.

The loop knows nothing about models or tasks. A method hands it the parameters it trains and a function
that returns the summed loss of a list of example indices::

    result = train(params, loss_fn, n_examples, TrainConfig(epochs=3, lr=1e-4), val_fn=val_fn)

    loss_fn(indices) -> (loss_sum, n_tokens)     loss_sum: scalar tensor with grad, the SUM over the examples
    val_fn() -> float                            a validation metric, higher is better

Why a hand-written loop and not ``transformers.Trainer``:

* **The loss is the method's business.** The classification loss needs the logits of the K label tokens
  at one position, not a vocabulary-wide LM loss over every token; heads trained on cached lower-layer
  activations never run the backbone at all. A loss over indices covers both without a model wrapper.
* **Exact kill-and-resume.** A checkpoint (written atomically) holds everything the rest of the run
  depends on: parameters, AdamW state, step, epoch and position within it, history, the best-epoch
  snapshot and patience counter, and the torch/CUDA/numpy/python RNG states of every process. The batch
  order is a pure function of ``(seed, epoch)`` and the learning rate a pure function of the step, so
  neither needs saving. A run killed at any point and resumed with ``resume=True`` ends with parameters
  bit-identical to an uninterrupted run (same process count); the tests SIGKILL a process to check it.
* **Small enough to read**, with the two numbers people get wrong stated once: how the gradient is
  normalised and what the schedule does at its ends.

Gradient normalisation, and why one process and N processes agree. An optimizer step consumes one global
batch ``B`` of ``config.batch_size`` examples (the last batch of an epoch may be smaller). Process ``r``
of ``W`` takes ``B[r::W]`` and splits it into ``grad_accum`` micro-batches ``m``; each calls
``backward(loss_fn(m) / |B|)``. The gradients of all micro-batches on all processes are then summed
(one all-reduce of a flat buffer, after the last micro-batch), which gives

    sum_r sum_m  grad( sum_{i in m} l_i ) / |B|  =  grad( (1/|B|) sum_{i in B} l_i )

the single-process gradient of the mean loss over ``B``, whatever the split. Clipping, the NaN check and
AdamW then run on identical gradients on every process, so the parameters stay identical without ever
being broadcast after the start. A 2-process run matches a 1-process run with the same global batch to
float rounding, provided ``loss_fn`` is deterministic (dropout draws differ: each process seeds its
generator with ``seed + rank``).

Validation under DDP runs on every process (no process waits idle and a ``val_fn`` that itself uses
collectives works); rank 0's value is broadcast so every process takes the same early-stopping decision.
Only rank 0 writes checkpoints and draws the progress bar.

Learning rate schedule: with ``w`` warmup steps and ``T`` steps in all, optimizer step ``s`` (0-based)
uses ``lr * lr_factor(s)``, with ``(s + 1) / (w + 1)`` during warmup (a ramp from 0 whose first step is
not wasted at lr 0, unlike ``LambdaLR``'s) and then ``p = (s - w) / (T - w)`` into cosine
``(1 + cos(pi p)) / 2``, linear ``1 - p`` or constant ``1``: it reaches 0 just after the last step.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lmtune.errors import LmtuneError

CHECKPOINT_FILE = "train_state.pt"
SCHEDULES = ("cosine", "linear", "constant")
MEGA_BATCHES = 50  # length grouping sorts within chunks of this many global batches (as HF does)
BUCKET_ELEMENTS = 1 << 25  # gradient all-reduce in flat buffers of at most this many elements
# Fields that do not change the result: a resumed run may change them freely.
_RESUME_FREE = ("checkpoint_dir", "checkpoint_every")
_FORMAT = 1


class TrainingDiverged(LmtuneError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Parameters
    ----------
    epochs : int
        Passes over the training examples.
    lr : float
        Peak learning rate of AdamW.
    weight_decay : float
        AdamW decoupled weight decay, applied to matrices only (no decay on 1-D parameters: biases,
        norm weights).
    warmup : float
        Linear warmup from 0: a fraction of all optimizer steps when < 1, a number of steps when >= 1.
    schedule : str
        After warmup: ``"cosine"``, ``"linear"`` (both decay to 0 at the end) or ``"constant"``.
    batch_size : int
        Examples per optimizer step, global: over all accumulation micro-batches and all processes.
    grad_accum : int
        Micro-batches per optimizer step on each process (trades memory for time, not the result).
    max_batch_tokens : int or None
        A memory budget: the most padded tokens (examples x their longest length) one micro-batch may
        hold. A micro-batch above it runs as the fewest equal parts that fit (an example longer than the
        budget runs alone), so the step's gradient is unchanged and its peak memory follows the budget
        instead of the epoch's longest batch. Needs per-example lengths. ``None``: no budget.
    clip : float or None
        Maximum global gradient norm; ``None`` turns clipping off.
    patience : int or None
        Stop after this many epochs without a validation improvement; ``None`` never stops early.
    restore_best : bool
        At the end, load the parameters of the best validation epoch (only when there is validation).
    seed : int
        Seeds the batch order (with the epoch) and torch's generator (dropout).
    max_steps : int or None
        Stop after this many optimizer steps in all; the schedule is stretched over this many.
    group_by_length : bool
        With per-example lengths, batch examples of similar length together (less padding).
    checkpoint_dir : str or None
        Folder for the resumable checkpoint; ``None`` writes none.
    checkpoint_every : int
        Optimizer steps between checkpoints; one is also written at the end of every epoch. 0: at
        epoch ends only.
    """

    epochs: int = 3
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.06
    schedule: str = "cosine"
    batch_size: int = 8
    grad_accum: int = 1
    max_batch_tokens: int | None = None
    clip: float | None = 1.0
    patience: int | None = None
    restore_best: bool = True
    seed: int = 0
    max_steps: int | None = None
    group_by_length: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0

    def __post_init__(self):
        def bad(name, expected):
            raise LmtuneError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("epochs", "batch_size", "grad_accum"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "a positive number")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            bad("weight_decay", "a number >= 0")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < math.inf):
            bad("warmup", "a fraction of the steps (< 1) or a number of steps (>= 1)")
        if self.schedule not in SCHEDULES:
            bad("schedule", "one of " + ", ".join(SCHEDULES))
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            bad("clip", "a positive number or None")
        if self.patience is not None and (not _is_int(self.patience) or self.patience < 1):
            bad("patience", "an integer >= 1 or None")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            bad("max_steps", "an integer >= 1 or None")
        if self.max_batch_tokens is not None and (not _is_int(self.max_batch_tokens) or self.max_batch_tokens < 1):
            bad("max_batch_tokens", "an integer >= 1 or None")
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            bad("checkpoint_every", "an integer >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; an unknown key is an error, a missing one takes its default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmtuneError(f"unknown training setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` did.

    ``history`` has one dict per epoch run (a run cut by ``max_steps`` ends with a partial epoch):
    ``epoch`` (1-based), ``steps`` (optimizer steps so far), ``train_loss`` (mean per example),
    ``val`` (metric or None), ``lr`` (at the epoch's last step), ``seconds`` (training time of the epoch,
    validation excluded), ``val_seconds``, ``examples_per_s``, ``tokens_per_s``. ``best_epoch`` is
    1-based. ``seconds`` is the wall time of this call (a resumed run counts from the resume).
    """

    steps: int
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val: float | None = None
    stopped_early: bool = False
    resumed_from_step: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready: non-finite numbers (a NaN validation metric) become None."""
        return _json_safe(dataclasses.asdict(self))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ----------------------------------------------------------------------------------------------------
# Pure functions of the configuration: the plan, the schedule, the batch order.

def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return -(-n_examples // batch_size)


def plan(config: TrainConfig, n_examples: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) of a run over ``n_examples``."""
    total = config.epochs * steps_per_epoch(n_examples, config.batch_size)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    if config.warmup < 1:
        warm = math.ceil(config.warmup * total - 1e-9)  # 0.06 * 50 is 3.0000000000000004, not 4 steps
    else:
        warm = int(config.warmup)
    return total, min(warm, total)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - p)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    raise LmtuneError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int,
                lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The global batches of one epoch: every index once, a deterministic function of the arguments.

    Without ``lengths``: a random permutation cut into batches. With ``lengths`` (HF-style length
    grouping): the permutation is cut into mega-chunks of ``MEGA_BATCHES`` batches, each sorted by length
    (longest first) and cut into batches, whose order is then shuffled; the batch with the longest example
    goes first, so an out-of-memory error shows on the first step rather than hours in. At most one
    batch is smaller than ``batch_size`` (the last, unless it holds the longest example).
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n_examples)
    if lengths is None:
        return [perm[i:i + batch_size].tolist() for i in range(0, n_examples, batch_size)]
    L = np.asarray(lengths)
    mega = MEGA_BATCHES * batch_size
    batches = []
    for i in range(0, n_examples, mega):
        chunk = perm[i:i + mega]
        chunk = chunk[np.argsort(-L[chunk], kind="stable")]
        batches += [chunk[j:j + batch_size].tolist() for j in range(0, len(chunk), batch_size)]
    last = batches.pop() if len(batches[-1]) < batch_size else None  # the short batch stays last
    batches = [batches[k] for k in rng.permutation(len(batches))]
    if last is not None:
        batches.append(last)
    longest = max(range(len(batches)), key=lambda k: L[batches[k]].max())
    batches.insert(0, batches.pop(longest))
    return batches


def micro_batches(batch: list[int], rank: int, world: int, grad_accum: int, lengths: Sequence[int] | None = None,
                  max_tokens: int | None = None) -> list[list[int]]:
    """This process's share of a global batch, ``batch[rank::world]``, cut into ``grad_accum`` parts; with
    ``max_tokens``, each part whose padded size ``len(part) * max(lengths)`` exceeds it is cut further into
    the fewest near-equal parts (in order) whose padded sizes fit, a single example being the smallest."""
    share = batch[rank::world]
    parts = [part.tolist() for part in np.array_split(np.asarray(share, dtype=np.int64), grad_accum) if len(part)]
    if max_tokens is None:
        return parts
    out = []
    for part in parts:
        k = 1
        while k < len(part) and any(len(p) > 1 and len(p) * max(lengths[i] for i in p) > max_tokens
                                    for p in np.array_split(np.asarray(part), k)):
            k += 1
        out.extend(p.tolist() for p in np.array_split(np.asarray(part, dtype=np.int64), k))
    return out


# ----------------------------------------------------------------------------------------------------
# Processes.

def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts ``torch.distributed`` under torchrun (WORLD_SIZE > 1) if nobody has."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_available():
        raise LmtuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (and all_gather_object) use the current device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_grads(grads: list[torch.Tensor]) -> None:
    """Sum ``grads`` over processes in place, in a few flat buffers (one collective each, not one per tensor)."""
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        bucket, size = [], 0
        for g in group + [None]:
            if g is None or (bucket and size + g.numel() > BUCKET_ELEMENTS):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0
            if g is not None:
                bucket.append(g)
                size += g.numel()


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# The loop.

@dataclass
class _Progress:
    """Everything about where the run stands; saved in checkpoints as plain Python values."""

    step: int = 0
    epoch: int = 0  # 0-based epoch in progress
    pos: int = 0  # global batches done in that epoch
    history: list = field(default_factory=list)
    best_val: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    finished: bool = False
    ep_loss: float = 0.0  # sums over the epoch in progress, all processes
    ep_examples: int = 0
    ep_tokens: int = 0
    ep_seconds: float = 0.0
    lr: float = 0.0


def _make_optimizer(plist: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in plist if p.ndim >= 2]
    no_decay = [p for p in plist if p.ndim < 2]
    groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, config.weight_decay), (no_decay, 0.0)) if g]
    return torch.optim.AdamW(groups, lr=config.lr)


def _lengths_hash(lengths) -> str | None:
    if lengths is None:
        return None
    return hashlib.sha1(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]


def _show_bar(progress: bool | None, rank: int) -> bool:
    if rank != 0:
        return False
    return sys.stderr.isatty() if progress is None else bool(progress)


def train(params: dict[str, torch.nn.Parameter], loss_fn: Callable[[list[int]], tuple[torch.Tensor, int]],
          n_examples: int, config: TrainConfig, *, lengths: Sequence[int] | None = None,
          val_fn: Callable[[], float] | None = None, resume: bool = False, progress: bool | None = None,
          desc: str = "train", on_step: Callable[[int], None] | None = None,
          after_update: Callable[[int, float], None] | None = None,
          clip_groups: Sequence[Sequence[str]] | None = None) -> TrainResult:
    """Train ``params`` with AdamW on ``loss_fn`` over examples ``0 .. n_examples - 1``.

    Parameters
    ----------
    params : dict of str to Parameter
        The trainable parameters, by name: only these are optimized, checkpointed and restored.
    loss_fn : callable
        ``loss_fn(indices) -> (loss_sum, n_tokens)``: the SUM of the per-example losses over ``indices``
        (a scalar tensor with grad) and the number of tokens processed (for throughput only). It sets the
        model's mode itself (``train()`` for dropout), since ``val_fn`` may switch to ``eval()``.
    n_examples : int
        Number of training examples.
    config : TrainConfig
    lengths : sequence of int, optional
        Per-example lengths (N,), for length grouping when ``config.group_by_length``.
    val_fn : callable, optional
        ``val_fn() -> float``, higher is better; called under ``torch.no_grad()`` after every epoch.
        Drives early stopping and the choice of the best epoch.
    resume : bool
        Continue from ``config.checkpoint_dir``'s checkpoint if there is one (else start afresh). The
        configuration must match the checkpoint's, except ``checkpoint_dir`` and ``checkpoint_every``.
    progress : bool or None
        Progress bar (rank 0 only); ``None`` shows it only when stderr is a terminal.
    desc : str
        Progress bar label.
    on_step : callable, optional
        ``on_step(step)`` after every optimizer step (1-based count of steps done), after any checkpoint
        written at that step.
    after_update : callable, optional
        ``after_update(step, lr)`` right after the optimizer update, with the step's learning rate, while
        the step's gradients are still there (AdaLoRA's rank allocator scores parameters by
        ``|p * grad|``; SVGD applies its prior there). Whatever it changes must be deterministic, as it is
        not replayed on resume.
    clip_groups : sequence of sequences of str, optional
        Parameter names whose gradient norm is clipped to ``config.clip`` together, each group on its own
        (SVGD's particles: each is clipped as the one model it stands for). Default: one group of all.

    Returns
    -------
    TrainResult
        With the parameters of the best validation epoch loaded when ``config.restore_best`` and there
        is validation, else the last parameters.

    Raises
    ------
    TrainingDiverged
        When a loss or the gradient norm is NaN or infinite (before the bad step touches the parameters).
    """
    names, plist = _check_params(params)
    groups = None
    if clip_groups is not None:
        groups = [[params[n] for n in g] for g in clip_groups]
        covered = [n for g in clip_groups for n in g]
        if sorted(covered) != sorted(names):
            raise LmtuneError("clip_groups must name every trainable parameter exactly once")
    if not _is_int(n_examples) or n_examples < 1:
        raise LmtuneError(f"training needs at least one example, got n_examples={n_examples!r}")
    if lengths is not None and len(lengths) != n_examples:
        raise LmtuneError(f"lengths has {len(lengths)} entries for {n_examples} examples")
    if config.max_batch_tokens is not None and lengths is None:
        raise LmtuneError("TrainConfig.max_batch_tokens needs the examples' lengths (train(..., lengths=...))")
    group_lengths = lengths if config.group_by_length else None
    device = plist[0].device
    rank, world = _distributed(device)
    total, warm = plan(config, n_examples)
    opt = _make_optimizer(plist, config)
    st = _Progress()
    best_params: dict[str, torch.Tensor] | None = None
    torch.manual_seed(config.seed + rank)
    if world > 1:
        _broadcast_params(plist)

    ckpt = Path(config.checkpoint_dir) / CHECKPOINT_FILE if config.checkpoint_dir else None
    identity = {"world_size": world, "n_examples": int(n_examples), "lengths": _lengths_hash(group_lengths),
                "params": {n: tuple(p.shape) for n, p in zip(names, plist)}}
    resumed_from = None
    if resume and ckpt is None:
        raise LmtuneError("resume=True needs config.checkpoint_dir, the folder of the run to resume")
    if resume and ckpt.exists():
        st, best_params = _load_checkpoint(ckpt, config, identity, names, plist, opt, rank)
        resumed_from = st.step

    t_start = time.perf_counter()
    bar = tqdm(total=total, initial=st.step, desc=desc, unit="step", disable=not _show_bar(progress, rank),
               dynamic_ncols=True)
    batches, batches_epoch = None, None
    try:
        while not st.finished:
            if batches_epoch != st.epoch:
                batches = batch_order(n_examples, config.batch_size, config.seed, st.epoch, group_lengths)
                batches_epoch = st.epoch
            t0 = time.perf_counter()
            st.lr = config.lr * lr_factor(st.step, total, warm, config.schedule)
            _step(batches[st.pos], loss_fn, plist, opt, config, st, rank, world, after_update, groups, lengths)
            st.step += 1
            st.pos += 1
            st.ep_seconds += time.perf_counter() - t0
            bar.update(1)
            secs = max(st.ep_seconds, 1e-9)
            bar.set_postfix(loss=f"{st.ep_loss / max(1, st.ep_examples):.4g}",
                            ex_s=f"{st.ep_examples / secs:.1f}", tok_s=f"{st.ep_tokens / secs:.0f}", refresh=False)
            if st.pos == len(batches) or st.step >= total:
                best_params = _end_epoch(st, config, total, val_fn, plist, names, best_params, world)
                due = True
            else:
                due = config.checkpoint_every > 0 and st.step % config.checkpoint_every == 0
            if due and ckpt is not None:
                _save_checkpoint(ckpt, config, identity, names, plist, opt, st, best_params, rank, world)
            if on_step is not None:
                on_step(st.step)
    finally:
        bar.close()

    if config.restore_best and best_params is not None:
        with torch.no_grad():
            for n, p in zip(names, plist):
                p.copy_(best_params[n])
    return TrainResult(steps=st.step, epochs_run=len(st.history), seconds=time.perf_counter() - t_start,
                       history=st.history, best_epoch=st.best_epoch, best_val=st.best_val,
                       stopped_early=st.stopped_early, resumed_from_step=resumed_from)


def _check_params(params) -> tuple[list[str], list[torch.nn.Parameter]]:
    if not isinstance(params, dict) or not params:
        raise LmtuneError("train() needs a non-empty dict of named trainable parameters")
    names = list(params)
    plist = list(params.values())
    frozen = [n for n, p in zip(names, plist) if not (isinstance(p, torch.Tensor) and p.requires_grad)]
    if frozen:
        raise LmtuneError(f"parameters {', '.join(frozen[:5])} do not require grad; pass only trainable ones")
    devices = {p.device for p in plist}
    if len(devices) > 1:
        raise LmtuneError(f"trainable parameters live on several devices ({', '.join(map(str, devices))})")
    return names, plist


def _broadcast_params(plist) -> None:
    """Start every process from rank 0's values, as DDP does."""
    import torch.distributed as dist

    with torch.no_grad():
        for p in plist:
            dist.broadcast(p.data, src=0)


def _step(batch: list[int], loss_fn, plist, opt, config: TrainConfig, st: _Progress, rank: int, world: int,
          after_update=None, groups: list[list[torch.nn.Parameter]] | None = None, lengths=None):
    """One optimizer step on one global batch: micro-batches, all-reduce, checks, clip, AdamW."""
    opt.zero_grad(set_to_none=True)
    device = plist[0].device
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for mb in micro_batches(batch, rank, world, config.grad_accum, lengths, config.max_batch_tokens):
        loss_sum, n_tokens = loss_fn(mb)
        if not isinstance(loss_sum, torch.Tensor) or loss_sum.ndim != 0 or not loss_sum.requires_grad:
            raise LmtuneError("loss_fn must return (loss_sum, n_tokens) with loss_sum a scalar tensor that "
                              "requires grad (the summed loss of the given examples)")
        (loss_sum / len(batch)).backward()
        loss_total += loss_sum.detach().double()
        tokens += int(n_tokens)
    grads = []
    for p in plist:
        if p.grad is None:  # unused here, or no examples on this process: an explicit zero, as in DDP
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    stats = torch.stack([loss_total, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if world > 1:
        import torch.distributed as dist

        _all_reduce_grads(grads)
        dist.all_reduce(stats)
    loss_sum_global, tokens_global = stats.tolist()
    where = f"step {st.step + 1} (epoch {st.epoch + 1}, lr {st.lr:.3g})"
    if not math.isfinite(loss_sum_global):
        raise TrainingDiverged(f"training diverged at {where}: the loss is {loss_sum_global}; "
                               "try a lower learning rate, gradient clipping (clip=1.0) or longer warmup")
    max_norm = config.clip if config.clip is not None else math.inf
    norm = max(float(torch.nn.utils.clip_grad_norm_(g, max_norm)) for g in (groups or [plist]))
    if not math.isfinite(norm):
        raise TrainingDiverged(f"training diverged at {where}: the gradient norm is {norm}; "
                               "try a lower learning rate, gradient clipping (clip=1.0) or longer warmup")
    for group in opt.param_groups:
        group["lr"] = st.lr
    opt.step()
    if after_update is not None:  # sees the step's (all-reduced) gradients, as AdaLoRA's allocator needs
        after_update(st.step + 1, st.lr)
    opt.zero_grad(set_to_none=True)
    st.ep_loss += loss_sum_global
    st.ep_examples += len(batch)
    st.ep_tokens += int(tokens_global)


def _end_epoch(st: _Progress, config: TrainConfig, total: int, val_fn, plist, names, best_params, world):
    """Validate, record the epoch, track the best parameters, decide whether to stop; returns best_params."""
    val, val_seconds = None, 0.0
    if val_fn is not None:
        t0 = time.perf_counter()
        with torch.no_grad():
            val = float(val_fn())
        if world > 1:
            import torch.distributed as dist

            v = torch.tensor(val, dtype=torch.float64, device=plist[0].device)
            dist.broadcast(v, src=0)
            val = float(v)
        val_seconds = time.perf_counter() - t0
        if st.best_val is None or val > st.best_val:  # NaN never improves
            st.best_val, st.best_epoch, st.bad_epochs = val, st.epoch + 1, 0
            best_params = {n: p.detach().to("cpu", copy=True) for n, p in zip(names, plist)}
        else:
            st.bad_epochs += 1
    secs = max(st.ep_seconds, 1e-9)
    st.history.append({"epoch": st.epoch + 1, "steps": st.step, "train_loss": st.ep_loss / max(1, st.ep_examples),
                       "val": val, "lr": st.lr, "seconds": st.ep_seconds, "val_seconds": val_seconds,
                       "examples_per_s": st.ep_examples / secs, "tokens_per_s": st.ep_tokens / secs})
    st.stopped_early = config.patience is not None and st.bad_epochs >= config.patience
    st.epoch += 1
    st.pos = 0
    st.ep_loss, st.ep_examples, st.ep_tokens, st.ep_seconds = 0.0, 0, 0, 0.0
    st.finished = st.stopped_early or st.step >= total or st.epoch >= config.epochs
    return best_params


# ----------------------------------------------------------------------------------------------------
# Checkpoints.

def _save_checkpoint(path: Path, config, identity, names, plist, opt, st, best_params, rank, world) -> None:
    """Rank 0 writes the whole state atomically (temp file + os.replace); every process gives its RNG state."""
    rng = _rng_state()
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    if rank != 0:
        return
    state = {
        "format": _FORMAT,
        "config": config.to_dict(),
        "identity": identity,
        "params": {n: p.detach().cpu() for n, p in zip(names, plist)},
        "optimizer": opt.state_dict(),
        "progress": dataclasses.asdict(st),
        "best_params": best_params,
        "rng": rng,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path, config, identity, names, plist, opt, rank):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LmtuneError(f"cannot read the checkpoint {path} ({e}); delete it to start afresh") from e
    if state.get("format") != _FORMAT:
        raise LmtuneError(f"{path} is a checkpoint of another format ({state.get('format')}); "
                          "delete it to start afresh")
    saved, now = dict(state["config"]), config.to_dict()
    diff = [f"{k}={saved.get(k)!r} (now {now[k]!r})"
            for k in now if k not in _RESUME_FREE and saved.get(k) != now[k]]
    for k, v in identity.items():
        if state["identity"].get(k) != v:
            what = {"world_size": "number of processes", "n_examples": "number of training examples",
                    "lengths": "example lengths", "params": "trainable parameters (names or shapes)"}[k]
            diff.append(f"the {what} differs")
    if diff:
        raise LmtuneError(f"cannot resume from {path}: it was written with " + "; ".join(diff) +
                          ". Resume with the same settings, or train afresh without resume (or delete it)")
    with torch.no_grad():
        for n, p in zip(names, plist):
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"][rank])
    return _Progress(**state["progress"]), state["best_params"]
