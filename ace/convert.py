"""Import of the released ACE checkpoints (ACE_REFERENCE section 5).

The released DiT comes in two spellings:

- split: ``blocks.N.attn.{q,k,v,o}``, ``blocks.N.cross_attn.{q,k,v,o}``,
  ``y_embedder.fc{1,2}``;
- fused (PixArt style): ``attn.qkv`` / ``attn.proj``, ``cross_attn.q_linear`` /
  ``kv_linear`` / ``proj``, ``y_embedder.y_proj.fc{1,2}``, and possibly a patch
  embedding without the mask channel.

``official_dit_to_ace`` maps either to the keys of ``ace.models.ACETransformer``
(fused ``attn.qkv`` and ``cross_attn.kv``; ``proj`` for output projections). The
released code normalises q AND k with ``norm_q`` (its ``norm_k`` weights are never
used). For a model with ``share_qk_norm`` (the released presets) the converter drops
``norm_k``: the model does the same, and fine-tuning trains the one weight. For a model
without it, the converter copies ``norm_q`` into ``norm_k``, which computes the same.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# parts the released trainers may carry that the network never reads
_IGNORED = (
    re.compile(r"^y_embedder\.y_embedding$"),  # PixArt's null caption for training-time dropout
    re.compile(r".*\.freqs(_cis)?$"),  # cached RoPE tables
)

_RENAMES = [  # (released pattern, ace replacement), applied after stacking
    (r"^y_embedder\.y_proj\.fc([12])\.", r"y_embedder.fc\1."),
    (r"^(blocks\.\d+)\.attn\.o\.", r"\1.attn.proj."),
    (r"^(blocks\.\d+)\.cross_attn\.o\.", r"\1.cross_attn.proj."),
    (r"^(blocks\.\d+)\.cross_attn\.q_linear\.", r"\1.cross_attn.q."),
    (r"^(blocks\.\d+)\.cross_attn\.kv_linear\.", r"\1.cross_attn.kv."),
]

_ACE_KEY = re.compile(
    r"^(x_embedder\.proj|t_embedder\.mlp\.[02]|t_block\.1|y_embedder\.fc[12]|final_layer\.linear)"
    r"\.(weight|bias)$"
    r"|^final_layer\.scale_shift_table$"
    r"|^blocks\.\d+\.(scale_shift_table"
    r"|(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.fc[12])\.(weight|bias)"
    r"|(attn|cross_attn)\.norm_[qk]\.weight)$"
)


def _unwrap(state_dict: dict) -> dict[str, Tensor]:
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"expected a state dict (a dict of tensors), got {type(state_dict).__name__}"
        )
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            # a training checkpoint may hold other weights beside it ({"model", "ema"}); an
            # optimizer state or a config is not a dict of tensors and does not count
            others = sorted(k for k, v in state_dict.items() if k != wrapper and _is_weights(v))
            if others:
                ema = [k for k in others if "ema" in k.lower()]
                hint = f"; e.g. checkpoint[{ema[0]!r}] for the EMA weights" if ema else ""
                raise ValueError(
                    f"the checkpoint holds several state dicts ({[wrapper, *others]}): pass "
                    f"the one to convert{hint}"
                )
            state_dict = state_dict[wrapper]
            break
    # strip prefixes that trainers add: DDP's "module.", scepter's "model."
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    if any(re.match(r"^blocks\.\d+\.cross_attn\.kv\.", k) for k in out):
        raise ValueError(
            "the checkpoint is already in ace's layout (attn.qkv, cross_attn.kv): load it "
            "into ACETransformer directly"
        )
    return out


def _is_weights(value) -> bool:
    """A non-empty dict whose values are all tensors: a state dict."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, Tensor) for v in value.values())
    )


def official_dit_to_ace(
    state_dict: dict, in_channels: int = 4, share_qk_norm: bool = False
) -> dict[str, Tensor]:
    """Convert a released ACE DiT state dict (either spelling) to ``ACETransformer`` keys.

    Args:
        state_dict: the released checkpoint, optionally wrapped as ``{"state_dict": ...}``.
        in_channels: latent channels C. A patch embedding with exactly C input channels
            (no mask channel) gets a zero-weight mask channel appended.
        share_qk_norm: the target model's ``config.share_qk_norm`` (True for the released
            presets): no ``norm_k`` keys; else ``norm_k`` is a copy of ``norm_q``.

    Returns:
        a new dict that loads into ``ACETransformer`` with ``strict=True``.

    Raises:
        ValueError: on keys it does not know, or a split q/k/v with a part missing.
    """
    sd = {k: v for k, v in _unwrap(state_dict).items() if not any(p.match(k) for p in _IGNORED)}
    out: dict[str, Tensor] = {}
    # 1. stack split projections into our fused ones
    for key in list(sd):
        if key not in sd:  # popped with its block's q
            continue
        m = re.match(r"^(blocks\.\d+)\.(attn|cross_attn)\.([qkv])\.(weight|bias)$", key)
        if not m:
            continue
        blk, kind, _, what = m.groups()
        parts = [f"{blk}.{kind}.{n}.{what}" for n in ("q", "k", "v")]
        missing = [p for p in parts if p not in sd]
        if missing:
            raise ValueError(f"split checkpoint: {key} is present but {missing} are missing")
        key = parts[0]
        if kind == "attn":
            out[f"{blk}.attn.qkv.{what}"] = torch.cat([sd.pop(p) for p in parts])
        else:
            out[f"{blk}.cross_attn.q.{what}"] = sd.pop(key)
            out[f"{blk}.cross_attn.kv.{what}"] = torch.cat([sd.pop(p) for p in parts[1:]])
    # 2. rename the rest
    for key, value in sd.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    unknown = sorted(k for k in out if not _ACE_KEY.match(k))
    if unknown:
        raise ValueError(
            f"unknown keys in the ACE checkpoint: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    # 3. the norm quirk: the released model normalises k with norm_q; its stored norm_k is
    # never used. A model with share_qk_norm (the released presets) has no norm_k; one
    # without gets a copy of norm_q, which computes the same
    for key in [k for k in out if k.endswith(".norm_q.weight")]:
        k_key = key.replace(".norm_q.", ".norm_k.")
        if share_qk_norm:
            out.pop(k_key, None)
        else:
            out[k_key] = out[key].clone()
    # 4. a patch embedding without the mask channel reads the mask with zero weights
    w = out.get("x_embedder.proj.weight")
    if w is not None and w.shape[1] == in_channels:
        out["x_embedder.proj.weight"] = torch.cat(
            [w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], dim=1
        )
    return out
