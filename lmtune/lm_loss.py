"""The completion (language-modelling) loss over target tokens only, with optional sequence packing.

Why by hand: the usual route (``model(input_ids, labels=...)``) forms the full-vocabulary logits at every
position, prompt included, and then throws most of them away. Here the backbone's final hidden states
are gathered at the positions that *predict* a target token, and only those rows go through the output
layer: the same loss, with the (positions x vocabulary) work and memory cut to the answer tokens.

Weighting: each record's loss is the mean over its own target tokens, and records weigh equally in a
batch (the training loop averages per-record losses over the global batch). Token-weighted averaging
would let one long answer outweigh many short ones; with per-record means a batch's gradient is the
same whether the records are packed together, padded, or split over processes.

Packing
-------
Several short records can share one row, each keeping its own position ids (0, 1, 2, ... restarting at
every record) with no attention mask given: transformers then builds a block-diagonal causal mask from
the restarting position ids (``masking_utils.find_packed_sequence_indices``), so no record attends to
another. Rows are filled first-fit-decreasing up to the batch's longest record, so packing never makes a
row longer than the unpacked batch would be. Packing is offered only for model types whose masking
follows position ids this way (the Llama family; checked by a test), and never with virtual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

PACKABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite"}


def pack_rows(lengths: list[int], capacity: int | None = None) -> list[list[int]]:
    """Group item indices into rows of total length <= ``capacity`` (default: the longest item),
    first-fit-decreasing; items keep no particular order within a row."""
    capacity = max(lengths) if capacity is None else capacity
    if max(lengths) > capacity:
        raise ValueError(f"an item of length {max(lengths)} exceeds the row capacity {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@dataclass
class Layout:
    """Where each item of a batch sits: ``row[i]`` and ``offset[i]`` (its first token's column)."""

    row: list[int]
    offset: list[int]
    n_rows: int
    width: int


def layout(lengths: list[int], pack: bool) -> tuple[Layout, list[list[int]]]:
    """Rows for a batch: one item per row (right-padded), or first-fit-decreasing packing."""
    rows = pack_rows(lengths) if pack else [[i] for i in range(len(lengths))]
    row, offset = [0] * len(lengths), [0] * len(lengths)
    width = 0
    for r, items in enumerate(rows):
        col = 0
        for i in items:
            row[i], offset[i] = r, col
            col += lengths[i]
        width = max(width, col)
    return Layout(row, offset, len(rows), width), rows


def position_ids(lay: Layout, lengths: list[int]) -> torch.Tensor:
    """(rows, width) positions restarting at 0 for every item; padding continues as its own run."""
    pos = torch.zeros((lay.n_rows, lay.width), dtype=torch.long)
    used = [0] * lay.n_rows
    for i, n in enumerate(lengths):
        pos[lay.row[i], lay.offset[i]:lay.offset[i] + n] = torch.arange(n)
        used[lay.row[i]] = max(used[lay.row[i]], lay.offset[i] + n)
    for r in range(lay.n_rows):  # the tail pad of a packed row: a separate block nobody attends to
        pos[r, used[r]:] = torch.arange(lay.width - used[r])
    return pos


def target_positions(lay: Layout, targets: list[list[bool]], shift: int = 0):
    """Flat (row, column) of every position that predicts a target token, the item each belongs to,
    and the target's index within its item (the label is ``ids[item][index]``).

    ``shift`` is the number of columns in front of every row (virtual tokens).
    """
    rows, cols, items, index = [], [], [], []
    for i, t in enumerate(targets):
        for j in range(1, len(t)):  # token 0 has no context to be predicted from
            if t[j]:
                rows.append(lay.row[i])
                cols.append(shift + lay.offset[i] + j - 1)
                items.append(i)
                index.append(j)
    return rows, cols, items, index


def per_item_losses(hidden: torch.Tensor, head: torch.nn.Module, lay: Layout, ids: list[list[int]],
                    targets: list[list[bool]], shift: int = 0) -> torch.Tensor:
    """(B,) mean cross-entropy over each item's target tokens, from final hidden states (rows, T, d).

    Only the gathered positions go through ``head`` (the output layer)."""
    rows, cols, items, index = target_positions(lay, targets, shift)
    device = hidden.device
    h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    labels = torch.tensor([ids[i][j] for i, j in zip(items, index)], device=device)
    tok_loss = torch.nn.functional.cross_entropy(head(h).float(), labels, reduction="none")
    item = torch.tensor(items, device=device)
    n = torch.bincount(item, minlength=len(ids)).clamp(min=1)
    return torch.zeros(len(ids), device=device, dtype=tok_loss.dtype).index_add(0, item, tok_loss) / n


def completion_losses(lm, ids: list[list[int]], targets: list[list[bool]], *, pack: bool = False,
                      lower: list[torch.Tensor] | None = None, start: int = 0,
                      prefix: Callable[[int], torch.Tensor | None] | None = None,
                      share_prefix: bool = False) -> torch.Tensor:
    """(B,) mean NLL of each sequence's target tokens under ``lm`` as it is (adapters attached or not).

    Parameters
    ----------
    lm : lmtune.models.LM
    ids, targets : lists of per-sequence token ids and target masks
    pack : bool
        Several sequences per row (see the module doc); else one per row, right-padded.
    lower, start : optional
        Cached hidden states entering layer ``start`` for each sequence: only layers ``start..`` run.
    prefix : callable, optional
        ``prefix(rows)`` -> (rows, P, d) virtual-token embeddings to prepend, or None.
    share_prefix : bool
        Unpacked rows without ``lower``: run the sequences' common token prefix (up to the first position
        that predicts a target) and the virtual tokens once, broadcasting their keys and values
        (:func:`lmtune.features.continue_shared_head`; exact in value and gradient).
    """
    from lmtune.features import rows_after_head, shared_prefix_length
    from lmtune.lean_blocks import lean_blocks
    from lmtune.methods.tuned import backbone_of, layer_range

    device = lm.device
    bb = backbone_of(lm)
    full_ids = ids
    P = 0
    if share_prefix and not pack and lower is None:
        # the common prefix, ending before the first position that predicts a target
        first = min(next((j for j in range(1, len(t)) if t[j]), len(t)) for t in targets)
        P = shared_prefix_length(ids, limit=first - 1)
        ids = [s[P:] for s in ids]
    lengths = [len(s) for s in ids]
    lay, _ = layout(lengths, pack)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    tokens = torch.full((lay.n_rows, lay.width), pad, dtype=torch.long)
    mask = torch.zeros((lay.n_rows, lay.width), dtype=torch.long)
    for i, s in enumerate(ids):
        tokens[lay.row[i], lay.offset[i]:lay.offset[i] + len(s)] = torch.tensor(s)
        mask[lay.row[i], lay.offset[i]:lay.offset[i] + len(s)] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    # Packed: restarting position ids and no mask give transformers' block-diagonal causal mask.
    kwargs = ({"position_ids": position_ids(lay, lengths).to(device), "attention_mask": None} if pack
              else {"attention_mask": mask})
    shift = 0
    if lower is not None:
        emb = torch.zeros((lay.n_rows, lay.width, lower[0].shape[-1]), dtype=lower[0].dtype, device=device)
        for i, h in enumerate(lower):
            emb[lay.row[i], lay.offset[i]:lay.offset[i] + h.shape[0]] = h.to(device)
        with layer_range(lm, start) as top, lean_blocks(top):
            h = top(inputs_embeds=emb, use_cache=False, **kwargs).last_hidden_state
    else:
        embed = bb.get_input_embeddings()
        emb = embed(tokens)
        virtual = prefix(1) if prefix is not None else None
        if virtual is not None and pack:
            raise ValueError("packing cannot be combined with virtual tokens")
        head = [virtual.to(emb.dtype)] if virtual is not None else []
        if P:
            head.append(embed(torch.tensor([full_ids[0][:P]], device=device)))
        with lean_blocks(bb):
            if head:
                h = rows_after_head(bb, torch.cat(head, dim=1), emb, mask, share_prefix)
                shift = -P  # h covers the rows' own (suffix) tokens only
            else:
                h = bb(inputs_embeds=emb, use_cache=False, **kwargs).last_hidden_state
    return per_item_losses(h, lm.model.get_output_embeddings(), lay, full_ids, targets, shift)


def sequence_losses(lm, seqs, *, batch_size: int = 8,
                    prefix: Callable[[int], torch.Tensor | None] | None = None,
                    share_prefix: bool = False) -> np.ndarray:
    """Per-sequence mean target NLL (eval mode, no gradient), batched longest first."""
    out = np.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids), reverse=True)
    was_training = lm.model.training
    lm.model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                out[idx] = completion_losses(lm, [seqs[i].ids for i in idx], [seqs[i].targets for i in idx],
                                             prefix=prefix, share_prefix=share_prefix).cpu().numpy()
    finally:
        lm.model.train(was_training)
    return out
