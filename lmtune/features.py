"""Last-token hidden states ``Z`` and label-token logits ``L``, computed fast and cached on disk.

For a prompt ``x_{1:t}`` the causal LM's next-token logits are ``z_t A`` with ``z_t`` (d,) the final
(normed) hidden state and ``A`` (d, V) the output embedding. Classification needs only the K columns of
``A`` that belong to the label tokens, so this module runs the transformer *backbone*, keeps the hidden
state at each prompt's last real token, and multiplies by those K columns: ``L = Z A[:, labels]``. The
full-vocabulary logits of every position are never formed.

Four things make extraction fast on a CPU:

* **Shared prefix.** Every prompt of a task begins with the same tokens (the chat template's system turn
  and the instruction before ``{text}``). The longest common *token* prefix of the whole dataset is run
  once; its key/value cache is broadcast to every batch, and only the suffixes are computed. Working on
  token ids (not strings) makes this exact: each record's token sequence is the one the plain path sees.
* **Length-sorted batches** with right padding, so little compute is spent on pad tokens; results are
  returned in the caller's order.
* **The final layer only where it is read**: keys and values at every position, the rest at each
  prompt's last token (:mod:`lmtune.last_layer`; exact).
* **An on-disk cache** keyed by the model fingerprint, the exact token ids and the label tokens, so a refit
  with another ``lambda`` or target smoothing never touches the model again.

Memory stays O(batch) in N: with the cache on, ``Z`` and ``L`` are written straight into memory-mapped
``.npy`` files as batches finish, and read back memory-mapped, so a fit streams them from disk
(:mod:`lmtune.ridge` accumulates ``Z^T Z`` batch by batch).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmtune.last_layer import final_layer_at
from lmtune.lean_blocks import SDPA_LIKE
from lmtune.models import LM, cache_dir

FEATURE_VERSION = 2
MIN_SHARED_PREFIX = 4  # below this, a prefix cache costs more than it saves


@dataclass
class Features:
    """Z (N, d) float32 last-token hidden states; L (N, K) float32 label-token logits."""

    Z: np.ndarray
    L: np.ndarray

    def __len__(self) -> int:
        return len(self.Z)


def show_progress(progress: bool | None) -> bool:
    """``None`` means: show a bar only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all sequences, leaving at least one token each."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return max(n, 0)


def label_head(lm: LM, label_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of the output embedding (and bias) for the label tokens: A[:, labels]^T as (K, d)."""
    out = lm.model.get_output_embeddings()
    idx = torch.tensor(label_token_ids, device=out.weight.device)
    bias = out.bias[idx] if getattr(out, "bias", None) is not None else None
    return out.weight[idx], bias


def _prefix_cache(backbone, prefix: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from transformers import DynamicCache

    cache = DynamicCache(config=backbone.config)
    backbone(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _batch_cache(backbone, kv, batch: int):
    from transformers import DynamicCache

    # expand() makes views; the cache concatenates new keys into fresh tensors, so the shared prefix
    # is never written to.
    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv],
                        config=backbone.config)


def shared_prefix_length(seqs: list[list[int]], limit: int | None = None) -> int:
    """The batch's common token prefix worth running once: 0 for a single row or below
    ``MIN_SHARED_PREFIX``; at most ``limit`` when given."""
    if len(seqs) < 2:
        return 0
    P = common_prefix_length(seqs)
    P = P if limit is None else min(P, limit)
    return P if P >= MIN_SHARED_PREFIX else 0


def rows_after_head(backbone, head: torch.Tensor | None, embeds: torch.Tensor, mask: torch.Tensor,
                    share: bool) -> torch.Tensor:
    """Final hidden states (B, T, d) of the rows ``embeds`` that all follow ``head`` (1, H, d) or nothing:
    the head computed once when ``share`` (:func:`continue_shared_head`), else put in front of every row."""
    if head is None:
        return backbone(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    if share:
        return continue_shared_head(backbone, head, embeds, mask)
    B, H = mask.shape[0], head.shape[1]
    full_mask = torch.cat([torch.ones((B, H), dtype=mask.dtype, device=mask.device), mask], dim=1)
    return backbone(inputs_embeds=torch.cat([head.expand(B, -1, -1), embeds], dim=1), attention_mask=full_mask,
                    use_cache=False).last_hidden_state[:, H:]


def continue_shared_head(backbone, head: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                         how: str = "auto") -> torch.Tensor:
    """Final hidden states (B, T, d) of B right-padded rows ``embeds`` (B, T, d), ``mask`` (B, T), that all
    continue the same ``head`` (1, H, d) of input embeddings, with the head computed once.

    Exact in value and gradient: causal attention makes the head's activations the same in every row, so
    one copy serves all, and under autograd the gradients the rows send it are summed. Three ways:

    * ``"slots"`` (the default when the attention is sdpa or eager): the head's H tokens ride in the
      batch's padding. They take its first H padding positions in row-major order (after the rows' ends
      with right padding), and
      when the padding holds fewer than H the batch is widened by ``ceil(missing / B)`` columns. Each
      layer's attention reads the head's keys and values from those positions and puts them before every
      row's own (a cache object whose ``update`` gathers them and stores nothing), under a 4D mask lmtune
      builds: a row sees the head and itself causally; head token j sees head tokens 0..j; the head's
      rotary positions are 0..H-1 and the rows' from H. One pass over ``B x (T + widening)`` positions.
    * ``"row"``: the head becomes one more row of the batch, padded to T (so ``T - H`` positions of work
      are padding), and every row reads that row's first H keys and values. One pass over
      ``(B + 1) x T`` positions. On the built-in task's batches (8 prompts of 40 to 75 tokens after the
      26-token prefix) the slots way runs 5 to 7% fewer positions.
    * ``"cache"``: the head runs first as a batch of one and its keys/values are broadcast (``expand``)
      over the rows, which run with positions ``H ..``. For any model. A separate pass of one row is bound
      by the fixed cost of every call (the 26-token prompt prefix of the built-in task took 0.19 s of a
      1.37 s training step of SmolLM2-135M, about 120 batched tokens' worth).

    All work under transformers' activation checkpointing: the rows read the head's keys through a cache
    that stores nothing (:func:`_head_cache_class`), so a checkpointed layer may keep it and its
    recomputation reads the same keys again (the ``"cache"`` way runs its head pass unchecked).
    """
    B, T = mask.shape
    H = head.shape[1]
    layers = list(getattr(backbone, "layers", []))
    checkpointed = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)]
    config = backbone.config
    window = getattr(config, "sliding_window", None)
    W = _slots_width(mask, H) if how in ("auto", "slots") else T
    if how == "auto":
        masks_ok = getattr(config, "_attn_implementation", None) in (*SDPA_LIKE, "eager")
        how = "slots" if masks_ok and (window is None or window >= H + W) else "cache"
    if how == "slots":
        return _head_in_slots(backbone, head, embeds, mask, W, checkpointed)
    if how == "row":
        return _head_as_row(backbone, head, embeds, mask, checkpointed)
    from transformers import DynamicCache

    cache = DynamicCache(config=backbone.config)
    for layer in checkpointed:
        layer.gradient_checkpointing = False
    try:
        backbone(inputs_embeds=head, past_key_values=cache, use_cache=True)
    finally:
        for layer in checkpointed:
            layer.gradient_checkpointing = True
    ran = [layer for layer in cache.layers if getattr(layer, "is_initialized", True)]
    # A backbone cut to its top layers (lmtune.methods.tuned.layer_range) leaves the others' entries empty:
    # zero placeholders of the head's length (never read) keep the cache's length and the mask right.
    blank = torch.zeros_like(ran[0].keys)
    kv = [(layer.keys, layer.values) if getattr(layer, "is_initialized", True) else (blank, blank)
          for layer in cache.layers]
    kv = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv]
    full_mask = torch.cat([torch.ones((B, H), dtype=mask.dtype, device=mask.device), mask], dim=1)
    with _checkpointing_reads_cache(checkpointed):
        return backbone(inputs_embeds=embeds, attention_mask=full_mask,
                        past_key_values=_head_cache_class()(ddp_cache_data=kv, config=backbone.config),
                        position_ids=(H + torch.arange(T, device=mask.device)).expand(B, -1),
                        use_cache=True).last_hidden_state


@contextlib.contextmanager
def _checkpointing_reads_cache(checkpointed: list):
    """Let checkpointed layers run with a cache: lmtune's head caches store nothing, so a recomputation in
    the backward pass reads the same keys again (see :func:`continue_shared_head`)."""
    for layer in checkpointed:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in checkpointed:
            del layer._can_checkpoint_with_cache


def _slots_width(mask: torch.Tensor, H: int) -> int:
    """The batch width that leaves at least ``H`` padding positions (widening columns count as padding)."""
    B, T = mask.shape
    free = B * T - int(mask.sum())
    return T + max(0, -(-(H - free) // B))


def _head_in_slots(backbone, head, embeds, mask, W: int, checkpointed) -> torch.Tensor:
    """``continue_shared_head``'s ``"slots"`` way (see there); ``W`` is :func:`_slots_width`."""
    B, T = mask.shape
    H = head.shape[1]
    device = mask.device
    col = torch.arange(W, device=device)
    real = torch.nn.functional.pad(mask.bool(), (0, W - T))  # (B, W); the widening columns are padding
    slots = (~real).reshape(-1).nonzero().squeeze(1)[:H]  # flat positions of head tokens 0..H-1
    j = torch.arange(H, device=device)
    rows = torch.nn.functional.pad(embeds, (0, 0, 0, W - T)).reshape(B * W, -1)
    rows = rows.index_copy(0, slots, head[0].to(rows.dtype)).view(B, W, -1)
    positions = (H + col).repeat(B).index_copy(0, slots, j).view(B, W)
    head_index = torch.full((B * W,), -1, dtype=torch.long, device=device).index_copy(0, slots, j).view(B, W)
    unused = ~real & (head_index < 0)
    sees_head = (real[..., None] | (j <= head_index[..., None])
                 | (unused[..., None] & (j == 0)))  # (B, W, H); an unused position reads key 0, to stay finite
    own = real[:, :, None] & real[:, None, :] & (col[:, None] >= col[None, :])  # (B, W, W)
    h = _run_with_gathered_head(backbone, rows, torch.cat([sees_head, own], dim=2), positions,
                                slots // W, slots % W, checkpointed)
    return h[:, :T]


def _head_as_row(backbone, head, embeds, mask, checkpointed) -> torch.Tensor:
    """``continue_shared_head``'s ``"row"`` way (see there)."""
    B, T = mask.shape
    H = head.shape[1]
    device = mask.device
    rows = torch.cat([torch.nn.functional.pad(head, (0, 0, 0, T - H)), embeds], dim=0)  # (B + 1, T, d)
    valid = torch.cat([(torch.arange(T, device=device) < H)[None], mask.bool()], dim=0)  # (B + 1, T)
    q = torch.arange(T, device=device)
    own = (q[:, None] >= q[None, :])[None] & valid[:, None, :]  # (B + 1, T, T): causal over valid keys
    sees_head = torch.ones((B + 1, T, H), dtype=torch.bool, device=device)
    sees_head[0] = False  # the head row reads its own keys in place
    positions = torch.cat([q[None], (H + q)[None].expand(B, -1)], dim=0)
    h = _run_with_gathered_head(backbone, rows, torch.cat([sees_head, own], dim=2), positions,
                                torch.zeros(H, dtype=torch.long, device=device), q[:H], checkpointed)
    return h[1:]


def _run_with_gathered_head(backbone, rows, allowed, positions, slot_rows, slot_cols, checkpointed):
    """One pass over ``rows`` (N, W, d) whose head tokens sit at ``(slot_rows, slot_cols)``: every row's
    attention reads the head's keys and values, gathered from there, before its own, as ``allowed``
    (N, W, H + W) says."""
    blocked = torch.finfo(rows.dtype).min
    mask4 = torch.zeros(allowed[:, None].shape, dtype=rows.dtype, device=rows.device).masked_fill(
        ~allowed[:, None], blocked)
    with _checkpointing_reads_cache(checkpointed):
        return backbone(inputs_embeds=rows, attention_mask=mask4, position_ids=positions,
                        past_key_values=_gathered_head_cache_class()(slot_rows, slot_cols, config=backbone.config),
                        use_cache=True).last_hidden_state


@functools.lru_cache(maxsize=None)
def _gathered_head_cache_class():
    """The cache of the ``"slots"`` and ``"row"`` ways: every row's keys/values get the head's, gathered
    from its positions, prepended; it stores nothing."""
    from transformers import DynamicCache

    class GatheredHeadCache(DynamicCache):
        def __init__(self, slot_rows: torch.Tensor, slot_cols: torch.Tensor, **kwargs):
            super().__init__(**kwargs)
            self.slot_rows, self.slot_cols = slot_rows, slot_cols

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            n = key_states.shape[0]

            def with_head(t):  # t[rows, :, cols] is (H, heads, D)
                h = t[self.slot_rows, :, self.slot_cols].transpose(0, 1)[None]
                return torch.cat([h.expand(n, -1, -1, -1), t], dim=-2)

            return with_head(key_states), with_head(value_states)

    return GatheredHeadCache


@functools.lru_cache(maxsize=None)
def _head_cache_class():
    """The class of :func:`continue_shared_head`'s cache (defined on first use: transformers loads lazily)."""
    from transformers import DynamicCache

    class HeadCache(DynamicCache):
        """A cache holding a shared head's keys/values that returns ``head ++ new`` and stores nothing,
        so the same forward can run twice (activation checkpointing's recomputation)."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))

    return HeadCache


@torch.inference_mode()
def extract(lm: LM, input_ids: list[list[int]], label_token_ids: list[int], *, batch_size: int = 16,
            share_prefix: bool = True, progress: bool | None = None, desc: str = "features",
            out: Features | None = None) -> Features:
    """Run the model over prompts and return their last-token hidden states and label logits.

    Parameters
    ----------
    lm : LM
    input_ids : list of list of int
        N prompts, already tokenized (see :meth:`lmtune.tasks.ClassificationTask.encode`).
    label_token_ids : list of int
        The K label tokens.
    batch_size : int
    share_prefix : bool
        Compute the dataset's common token prefix once (exact; see the module docstring).
    progress : bool or None
        Progress bar; ``None`` shows it only on a terminal.
    out : Features, optional
        Preallocated (N, d) and (N, K) arrays to write into (memory-mapped files, say).

    Returns
    -------
    Features
        ``Z`` (N, d) and ``L`` (N, K), float32, in the order of ``input_ids``.
    """
    model = lm.model
    backbone = model.base_model
    device = lm.device
    A_lab, bias = label_head(lm, label_token_ids)  # (K, d), (K,)
    N, d = len(input_ids), lm.hidden_size
    if out is None:
        out = Features(np.empty((N, d), dtype=np.float32), np.empty((N, len(label_token_ids)), dtype=np.float32))
    Z, L = out.Z, out.L

    P = common_prefix_length(input_ids) if share_prefix else 0
    kv = _prefix_cache(backbone, input_ids[0][:P], device) if P >= MIN_SHARED_PREFIX else None
    if kv is None:
        P = 0
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    order = sorted(range(N), key=lambda i: len(input_ids[i]), reverse=True)

    with tqdm(total=N, desc=desc, unit="prompt", disable=not show_progress(progress), leave=False) as bar:
        for start in range(0, N, batch_size):
            idx = order[start:start + batch_size]
            B = len(idx)
            lengths = torch.tensor([len(input_ids[i]) - P for i in idx])
            T = int(lengths.max())
            ids = torch.full((B, T), pad, dtype=torch.long)
            mask = torch.zeros((B, P + T), dtype=torch.long)
            mask[:, :P] = 1
            for row, i in enumerate(idx):
                ids[row, :lengths[row]] = torch.tensor(input_ids[i][P:])
                mask[row, P:P + lengths[row]] = 1
            kwargs = {}
            if kv is not None:
                kwargs = {"past_key_values": _batch_cache(backbone, kv, B),
                          "position_ids": (P + torch.arange(T, device=device)).expand(B, -1), "use_cache": True}
            read = (lengths - 1).to(device)
            with final_layer_at(backbone, read):  # the final layer only at the read positions: exact
                h = backbone(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).last_hidden_state
            z = h[torch.arange(B, device=device), read]  # (B, d)
            logits = z @ A_lab.T  # (B, K)
            if bias is not None:
                logits = logits + bias
            Z[idx] = z.float().cpu().numpy()
            L[idx] = logits.float().cpu().numpy()
            bar.update(B)
    return out


def feature_key(lm: LM, input_ids: list[list[int]], label_token_ids: list[int]) -> str:
    """Cache key: model fingerprint, label tokens and the exact token ids (which already encode the data,
    the template, the chat formatting and the tokenizer)."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FEATURE_VERSION, "model": lm.fingerprint, "labels": list(label_token_ids),
                         "dtype": str(next(lm.model.parameters()).dtype)}).encode())
    h.update(np.asarray([len(s) for s in input_ids], dtype=np.int64).tobytes())
    if input_ids:
        h.update(np.concatenate([np.asarray(s, dtype=np.int64) for s in input_ids]).tobytes())
    return h.hexdigest()[:32]


def cached_extract(lm: LM, input_ids: list[list[int]], label_token_ids: list[int], *, cache: bool = True,
                   **kwargs) -> Features:
    """:func:`extract` through the on-disk cache (``$LMTUNE_CACHE/features/KEY/{Z,L}.npy``).

    A cache entry is written into a temporary folder and renamed into place when complete, so an
    interrupted extraction never leaves a partial entry; entries are read memory-mapped.
    """
    if not cache:
        return extract(lm, input_ids, label_token_ids, **kwargs)
    folder = feature_cache_path() / feature_key(lm, input_ids, label_token_ids)
    if (folder / "L.npy").is_file():
        return Features(np.load(folder / "Z.npy", mmap_mode="r"), np.load(folder / "L.npy", mmap_mode="r"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        N = len(input_ids)
        out = Features(np.lib.format.open_memmap(tmp / "Z.npy", "w+", np.float32, (N, lm.hidden_size)),
                       np.lib.format.open_memmap(tmp / "L.npy", "w+", np.float32, (N, len(label_token_ids))))
        extract(lm, input_ids, label_token_ids, out=out, **kwargs)
        out.Z.flush()
        out.L.flush()
        del out
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same entry first
            if not (folder / "L.npy").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Features(np.load(folder / "Z.npy", mmap_mode="r"), np.load(folder / "L.npy", mmap_mode="r"))


def feature_cache_path() -> Path:
    return cache_dir() / "features"
