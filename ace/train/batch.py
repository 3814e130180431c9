"""From a list of training LCUs to one packed batch: the frozen encoders' part of a step.

Shapes: B samples, T image tokens, T0 target tokens, Tt text tokens, C latent channels,
p patch size, D = p*p*C values per target token.

Every random choice of a step (condition dropout, VAE posterior samples) comes from
the ``generator`` the trainer seeds with (seed, step, rank), so a resumed run draws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from ace.conditioning import ConditionTokenizer, downsample_mask, preprocess_image, preprocess_mask
from ace.lcu import LCU
from ace.packing import PackedBatch
from ace.request import prepare_lcu, unconditional_texts


@dataclass
class TrainBatch:
    packed: PackedBatch
    tokens: Tensor  # (T, (C+1)*p*p) patch tokens; the target frames' rows are overwritten per step
    text: Tensor  # (Tt, E)
    x0: Tensor  # (T0, D) clean target latents, ordered (row in patch, column in patch, channel)
    target_mask: Tensor  # (T0, p*p) the target frame's mask values per token
    num_samples: int
    num_tokens: int  # image tokens of the batch, all frames (for throughput)


@dataclass
class PreparedLCU:
    """One training LCU, preprocessed: its frames (target first), masks and instructions."""

    frames: list[Tensor]  # per frame (3, H, W) in [-1, 1]
    masks: list[Tensor]  # per frame (1, H, W) in {0, 1}
    turns: list[str]  # instructions, oldest turn first, the current one last
    frame_turns: list[int]  # per frame: the turn whose text it reads


def prepare_training_lcu(lcu: LCU, max_seq_len: int) -> PreparedLCU:
    """Resize and crop an LCU that carries a target as the released trainer does."""
    if lcu.target is None:
        raise ValueError("a training LCU needs a target")
    target = preprocess_image(lcu.target, max_seq_len)  # (3, H, W)
    size = tuple(target.shape[1:])
    prepared = prepare_lcu(lcu, max_seq_len, size)
    tmask = (
        preprocess_mask(lcu.target_mask, size)
        if lcu.target_mask is not None
        else prepared.target_mask
    )
    return PreparedLCU(
        [target, *prepared.images], [tmask, *prepared.masks], lcu.instructions(), lcu.frame_turns()
    )


def encode_batch(
    lcus: list,
    conditioner: ConditionTokenizer,
    model,
    max_seq_len: int,
    cond_dropout: float,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> TrainBatch:
    """Preprocess, encode (T5 once for every instruction of the batch, the VAE in calls
    shared by equal-size images) and pack a list of LCUs that each carry a target; or pack a list of
    ``EncodedLCU`` read from an embedding cache (``ace.train.cache``), which skips both
    encoders. With the same generator the two give the same batch (up to float rounding
    of batched encoder calls): the same dropout draws, then the same posterior noise."""
    from ace.train.cache import EncodedLCU

    if lcus and all(isinstance(x, EncodedLCU) for x in lcus):
        return _encode_cached(lcus, conditioner, model, cond_dropout, generator, device, dtype)
    items = []
    for i, lcu in enumerate(lcus):
        if getattr(lcu, "target", None) is None:
            raise ValueError(f"training LCU {i} has no target")
        items.append(prepare_training_lcu(lcu, max_seq_len))
    all_prompts, prompt_index, dropped = [], [], []
    for item in items:
        prompt_index.append([len(all_prompts) + t for t in item.frame_turns])
        all_prompts.extend(item.turns)
        dropped.append(_drop(generator, cond_dropout))
    if any(dropped):  # one empty prompt, read as the unconditional half reads it
        all_prompts.append("")
        for i in (i for i, d in enumerate(dropped) if d):
            prompt_index[i] = unconditional_texts(prompt_index[i], len(all_prompts) - 1)
    states = conditioner.encode_text(all_prompts)
    texts = [[states[j].to(device) for j in idx] for idx in prompt_index]
    flat = [x for item in items for x in item.frames]
    latents = iter(conditioner.encode_images(flat, generator=generator))
    lat = [[next(latents).to(device, dtype) for _ in item.frames] for item in items]
    f = conditioner.vae_factor
    lmasks = [[downsample_mask(m, f).to(device, dtype) for m in item.masks] for item in items]
    return pack_batch(lat, lmasks, texts, model)


def _drop(generator: torch.Generator, cond_dropout: float) -> bool:
    """One draw per LCU, in batch order: train it on the unconditional half's texts
    (``request.unconditional_texts``)?"""
    return torch.rand((), generator=generator).item() < cond_dropout


def _encode_cached(items, conditioner, model, cond_dropout, generator, device, dtype):
    texts = []
    for item in items:
        frame_texts = [item.texts[t] for t in item.frame_turns]
        if _drop(generator, cond_dropout):
            frame_texts = unconditional_texts(frame_texts, item.empty_text)
        texts.append([t.to(device) for t in frame_texts])
    flat = [(m, s) for item in items for m, s in zip(item.means, item.stds)]
    latents = iter(conditioner.sample_latents(flat, generator=generator))
    lat = [[next(latents).to(device, dtype) for _ in item.means] for item in items]
    lmasks = [[m.to(device, dtype) for m in item.masks] for item in items]
    return pack_batch(lat, lmasks, texts, model)


def pack_batch(
    lat: list[list[Tensor]], lmasks: list[list[Tensor]], texts: list[list[Tensor]], model
) -> TrainBatch:
    """Per sample its frames' latents (C, h, w) (target first), latent masks (1, h, w) and
    per-frame texts (L, E) -> one packed ``TrainBatch``."""
    packed = model.pack(
        [[tuple(x.shape[-2:]) for x in fs] for fs in lat],
        [[t.shape[0] for t in ts] for ts in texts],
        device=lat[0][0].device,  # where the latents are: model.device walks every module
    )
    tokens = packed.pack_frames(lat, lmasks)
    p = model.config.patch_size
    x0 = torch.cat(
        [rearrange(fs[0].float(), "c (h p) (w q) -> (h w) (p q c)", p=p, q=p) for fs in lat]
    )
    tmask = torch.cat(
        [rearrange(ms[0], "c (h p) (w q) -> (h w) (c p q)", p=p, q=p) for ms in lmasks]
    )
    return TrainBatch(
        packed, tokens, packed.pack_texts(texts), x0, tmask, len(lat), packed.num_tokens
    )


def noisy_tokens(batch: TrainBatch, x_t: Tensor, patch_size: int) -> Tensor:
    """Write noisy target latents (T0, D) into the batch's patch tokens (input layout)."""
    p = patch_size
    x_in = rearrange(x_t, "n (p q c) -> n c (p q)", p=p, q=p)  # (T0, C, p*p)
    x_in = torch.cat([x_in.to(batch.tokens.dtype), batch.target_mask[:, None]], dim=1).flatten(
        1
    )  # (T0, (C+1)*p*p)
    return batch.tokens.index_copy(0, batch.packed.target_index, x_in)
