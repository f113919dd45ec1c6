"""The final decoder layer computed only where its output is read.

A classifier reads the final hidden state at one position per row (the prompt's last token). In the final
layer every other position still needs its keys and values (the read position attends to them), but not
its query, attention output, output projection or feed-forward block: for SmolLM2-135M that is 94% of the
layer's matrix products (q 576x576, o 576x576 and the 3 x 576x1536 MLP against k and v at 576x192 each). On
the demo's LoRA, which trains the top 4 blocks over cached lower activations, the final layer is a
quarter of every forward and backward pass.

:func:`final_layer_at` swaps the final layer's ``forward`` for one that computes keys and values at every
position and the rest at one position per row, for the duration of a block, and returns the layer's usual
(N, T, d) output with zeros at the positions not computed. It calls the layer's own submodules (so LoRA,
DoRA and lmtune's adapter hooks on ``o_proj``/``down_proj`` run as usual), the model's own rotary
rotation (``rotate_half``) and attention implementation (sdpa, eager, or :mod:`lmtune.lean_blocks`'
grouped-query sdpa), and the cache's ``update`` (so lmtune's shared prompt prefix works unchanged). It is
exact in value and gradient (tested against the full layer), written by hand because transformers
computes every position of every layer (``logits_to_keep`` trims only the vocabulary head).

Only the Llama-style layer is handled (``llama``, ``mistral``, ``qwen2``: pre-norm attention with
``q/k/v/o_proj`` and a pre-norm MLP, no query/key norms); anything else, or a call whose batch or
positions do not match, runs the full layer.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from lmtune.lean_blocks import SDPA_LIKE, SUPPORTED_MODEL_TYPES


def supported(backbone) -> bool:
    config = backbone.config
    layers = getattr(backbone, "layers", None)
    if not layers or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in (*SDPA_LIKE, "eager"):
        return False
    last = layers[-1]
    attn = getattr(last, "self_attn", None)
    need = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
    return (attn is not None and all(hasattr(attn, n) for n in need)
            and all(hasattr(last, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp"))
            and not hasattr(attn, "q_norm"))


@contextlib.contextmanager
def final_layer_at(backbone, positions: torch.Tensor | None):
    """Within the block, the backbone's final layer computes its output only at ``positions`` (B,), one
    per row (a row of B + 1 gets position 0 first: lmtune's shared-prefix head row). ``None``, or a
    backbone :func:`supported` refuses, changes nothing."""
    if positions is None or not supported(backbone):
        yield
        return
    layer = backbone.layers[-1]
    layer.forward = _forward_at(layer, positions)
    try:
        yield
    finally:
        del layer.forward


def _forward_at(layer, positions: torch.Tensor):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    full = type(layer).forward.__get__(layer)
    attn = layer.self_attn
    model_module = sys.modules[type(attn).__module__]
    rotate_half = model_module.rotate_half
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                   model_module.eager_attention_forward)
    last = int(positions.max())

    def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        N, T, _ = hidden_states.shape
        sel = positions.to(hidden_states.device)
        if N == sel.shape[0] + 1:
            sel = torch.cat([sel.new_zeros(1), sel])
        if (N != sel.shape[0] or position_embeddings is None or last >= T
                or (attention_mask is None and getattr(attn, "sliding_window", None))):
            return full(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache,
                        position_embeddings=position_embeddings, **kwargs)
        rows = torch.arange(N, device=hidden_states.device)
        hd = attn.head_dim
        x = layer.input_layernorm(hidden_states)
        k = attn.k_proj(x).view(N, T, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(N, T, -1, hd).transpose(1, 2)
        q = attn.q_proj(x[rows, sel][:, None]).view(N, 1, -1, hd).transpose(1, 2)
        cos, sin = (e.expand(N, -1, -1) for e in position_embeddings)  # (N, T, hd): the model's rotary
        cq, sq = cos[rows, sel][:, None, None], sin[rows, sel][:, None, None]
        q = q * cq + rotate_half(q) * sq
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        S = k.shape[2]
        if attention_mask is None:  # causal: the selected query is key S - T + sel
            allowed = torch.arange(S, device=k.device)[None] <= (S - T + sel)[:, None]
            mask = torch.zeros((N, 1, 1, S), dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~allowed[:, None, None], torch.finfo(q.dtype).min)
        else:
            mask = attention_mask.expand(N, -1, -1, -1)[rows, :, sel][:, :, None]
        out, _ = attend(attn, q, k, v, mask, dropout=0.0 if not attn.training else attn.attention_dropout,
                        scaling=attn.scaling)
        h = hidden_states[rows, sel][:, None] + attn.o_proj(out.reshape(N, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return hidden_states.new_zeros(hidden_states.shape).index_put((rows, sel), h[:, 0])

    return forward
