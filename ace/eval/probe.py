"""Probe a trained pipeline: does it copy its input image, and does it read its instruction?

Sampling scores (``ace.eval.harness``) say THAT a model fails a task; these say WHY, from
one network call per LCU and noise level, on LCUs that carry their target:

- ``x0_mse@L``: latent MSE of the clean target the model implies at noise level L
  (``Objective.predict_x0``) against the true one. ``copy_mse`` is the same for the
  image the request starts from taken as the answer (the current turn's first image,
  else the latest history image: the harness's copy baseline): an editing model should
  beat it at high noise, where only the input can tell it what the target looks like.
- ``text_effect@L``: |pred - pred with the current instruction blanked| / |pred|, the
  instruction's pull on the prediction (every frame of the current turn reads the empty
  text; the pipeline's unconditional half blanks only the target and the last frame).
- ``copy_attention``: per self-attention layer, the largest (over heads) mean attention
  weight from a target token to the token at the same (row, column) of that starting
  image, at the highest level. Uniform attention gives 1 / (tokens of the sample); a
  head that copies the input gives close to 1.
- ``x0_psnr@L``: PSNR (dB, whole image) of that implied clean target, decoded by the VAE,
  against the target's pixels: the model's best single guess, which a sampler's draw
  only matches where the model is sure. ``mean_psnr`` is the same for the mean target
  the caller gives per family (``scripts/probe.py`` on toy data: the mean of 256 training
  targets, the baseline ``ace.eval.harness`` scores text-to-image and analysis tasks
  against; otherwise the mean of the family's OTHER probed targets, NaN for a family
  probed once), and
  ``vae_psnr`` for the target through the VAE, the ceiling. A family whose ``x0_psnr``
  at high noise stays under ``mean_psnr`` has not learned what its instruction and
  inputs say the image is; one above it that still loses when sampled is hurt by the
  sampler's draw, not by what the model knows.

LCUs without an input image (text-to-image) are probed too: their ``copy_mse`` is NaN
and they have no ``copy_attention``.

    from ace.eval.probe import probe
    report = probe(pipe, lcus, levels=(0.5, 0.8, 0.95))
    report.per_task["recolor"]["text_effect@0.95"]
    report.per_task["text_to_image"]["x0_psnr@0.95"], report.per_task["text_to_image"]["mean_psnr"]

A noise level L in (0, 1] is the flow time s = L, or the DDPM step round(L * (T - 1)).
Shapes: C latent channels, h x w latent frame, n target tokens, T tokens of the sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ace.conditioning import downsample_mask, to_numpy
from ace.diffusion import DDPMEpsilon, objective_for_scheduler
from ace.eval.metrics import leave_one_out_means, psnr
from ace.models.rope import apply_rope


@dataclass
class ProbeReport:
    per_task: dict[str, dict[str, Any]]
    """Per task family: the metrics above (means over its LCUs), ``copy_attention`` as
    one value per layer, and ``n``."""
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: an undefined or infinite metric becomes null, in lists too."""

        def clean(v: Any) -> Any:
            if isinstance(v, list):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and not math.isfinite(v) else v

        tasks = {t: {k: clean(v) for k, v in m.items()} for t, m in self.per_task.items()}
        return {"tasks": tasks, "config": self.config}


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    levels = tuple(float(v) for v in levels)
    if not levels or any(not 0 < v <= 1 for v in levels):  # NaN fails too
        raise ValueError(f"levels must be a non-empty list of noise levels in (0, 1], got {levels}")
    keys = [f"{v:g}" for v in levels]  # the metric names carry the level as :g prints it
    if len(set(keys)) < len(keys):
        raise ValueError(f"levels must be distinct (as printed), got {', '.join(keys)}")
    return tuple(sorted(levels))


class _AttentionTap:
    """Forward hooks on every self-attention layer that keep its attention weights
    (H, T, T) of a one-sample batch, or ``reduce`` of them (the full maps of a large model
    would not fit)."""

    def __init__(self, blocks: Iterable[torch.nn.Module], reduce=None):
        self.maps: list[Tensor] = []
        self.reduce = reduce
        self.handles = [b.attn.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, _out) -> None:
        x, cos, sin = args[:3]  # one sample: all its tokens are one segment
        q, k, _v = module.qkv(x).chunk(3, dim=-1)  # (T, d) each
        q, k = module.norm_q(q), module.key_norm(k)
        q, k = (t.unflatten(-1, (module.num_heads, -1)) for t in (q, k))  # (T, H, D)
        q, k = apply_rope(q, cos, sin).float(), apply_rope(k, cos, sin).float()
        logits = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])  # (H, T, T)
        weights = logits.softmax(-1)
        self.maps.append(self.reduce(weights) if self.reduce is not None else weights)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def probe(
    pipe: Any,
    lcus: Iterable[Any],
    levels: Sequence[float] = (0.5, 0.8, 0.95),
    seed: int = 0,
    progress: bool = True,
    means: dict[str, np.ndarray | None] | None = None,
) -> ProbeReport:
    """Probe ``pipe`` (an ``ACEPipeline``) on ``lcus`` that have a target. ``means``: per
    task a mean-target image (toy LCUs: ``ace.eval.harness.mean_targets``, the evaluation's
    baseline); a task without one, or of another size, faces the mean of its other probed
    targets instead."""
    from ace.train.batch import prepare_training_lcu

    levels = _check_levels(levels)
    conditioner, model = pipe.conditioner, pipe.transformer
    objective = objective_for_scheduler(pipe.scheduler)
    device = model.device
    ind = pipe.indicators.table.to(device, model.dtype)
    blank = conditioner.encode_text([""])[0]
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[dict[str, Any]]] = {}
    targets: dict[str, list[np.ndarray]] = {}  # per task, its targets' pixels (H, W, 3) in [0, 1]
    for i, lcu in enumerate(tqdm(list(lcus), desc="probe", unit="LCU", disable=not progress)):
        if lcu.target is None:
            raise ValueError(f"lcus[{i}] ({lcu.task}): the probe needs an LCU with a target")
        it = prepare_training_lcu(lcu, pipe.max_seq_len)
        lat = conditioner.encode_images(it.frames, sample=False)  # frame 0 = target, (C, h, w)
        pixels = _pixels(it.frames[0][None])  # (H, W, 3)
        targets.setdefault(lcu.task, []).append(pixels)
        states = conditioner.encode_text(it.turns)
        texts = [states[k] for k in it.frame_turns]
        current = len(it.turns) - 1
        blanked = [blank if k == current else states[k] for k in it.frame_turns]
        masks = [downsample_mask(m, conditioner.vae_factor).to(device) for m in it.masks]
        x0 = lat[0].to(device)
        start = _start_frame(it.frame_turns, current)
        first = lat[start].to(device) if start is not None else None
        offset = sum(_tokens(model, lat[j]) for j in range(start or 0))  # its first token
        same_position = partial(_same_position, n=_tokens(model, x0), offset=offset)
        comparable = first is not None and first.shape == x0.shape
        row: dict[str, Any] = {
            "copy_mse": ((first - x0) ** 2).mean().item() if comparable else math.nan,
            "vae_psnr": psnr(_pixels(conditioner.decode(x0[None])), pixels),
        }
        for level in levels:
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = _time(objective, level).to(device)  # (1,)
            x_t = objective.add_noise(x0[None], noise[None], t)[0]
            frames = [x_t, *[x.to(device) for x in lat[1:]]]
            copyable = level == levels[-1] and comparable
            tap = _AttentionTap(model.blocks, same_position) if copyable else None
            timesteps = objective.model_timesteps(t)
            try:
                (out,) = model.predict([frames], [masks], [texts], timesteps, ind)
            finally:
                if tap is not None:
                    tap.remove()
            (out_blank,) = model.predict([frames], [masks], [blanked], timesteps, ind)
            x0_hat = objective.predict_x0(x_t[None], out[None].float(), t)[0]
            row[f"x0_mse@{level:g}"] = ((x0_hat - x0) ** 2).mean().item()
            row[f"x0_psnr@{level:g}"] = psnr(_pixels(conditioner.decode(x0_hat[None])), pixels)
            row[f"text_effect@{level:g}"] = ((out - out_blank).norm() / out.norm()).item()
            if tap is not None and tap.maps:  # the best head of each layer
                row["copy_attention"] = [heads.max().item() for heads in tap.maps]
        rows.setdefault(lcu.task, []).append(row)
    for task, rs in rows.items():  # the mean baseline: given, else the others' mean
        fixed = (means or {}).get(task)
        for row, target, mean in zip(rs, targets[task], leave_one_out_means(targets[task])):
            if fixed is not None and fixed.shape == target.shape:
                mean = fixed
            row["mean_psnr"] = math.nan if mean is None else psnr(mean, target)
    per_task = {task: _mean(rs) for task, rs in rows.items()}
    config = {"levels": list(levels), "seed": seed, "objective": objective.name}
    return ProbeReport(per_task, config)


def _pixels(images: Tensor) -> np.ndarray:
    """(1, 3, H, W) nominally in [-1, 1] -> (H, W, 3) float64 in [0, 1], rounded to 8 bits
    as the pipeline's images are (``ace.conditioning.postprocess``)."""
    return (to_numpy(images)[0] * 255).astype(np.uint8) / 255.0


def _start_frame(frame_turns: Sequence[int], current: int) -> int | None:
    """The frame the request starts from (frame 0 is the target): the current turn's first
    image, else the latest history image, else None (text-to-image)."""
    inputs = range(1, len(frame_turns))
    own = [k for k in inputs if frame_turns[k] == current]
    return own[0] if own else (inputs[-1] if len(inputs) else None)


def _same_position(weights: Tensor, n: int, offset: int) -> Tensor:
    """(H, T, T) -> (H,): mean weight from target token j (frame 0, n tokens) to token j of
    the frame that starts at token ``offset`` and has the target's shape."""
    idx = torch.arange(n, device=weights.device)
    return weights[:, idx, offset + idx].mean(-1)


def _time(objective, level: float) -> Tensor:
    """(1,) the objective's time for a noise level in (0, 1]."""
    if isinstance(objective, DDPMEpsilon):
        return torch.tensor([float(round(level * (objective.num_train_timesteps - 1)))])
    return torch.tensor([level])


def _tokens(model, latent: Tensor) -> int:
    """Tokens of one latent frame (C, h, w)."""
    p = model.config.patch_size
    return (latent.shape[-2] // p) * (latent.shape[-1] // p)


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        if key == "copy_attention":
            continue
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    maps = [r["copy_attention"] for r in rows if "copy_attention" in r]
    out["copy_attention"] = [sum(v) / len(maps) for v in zip(*maps)] if maps else []
    out["n"] = len(rows)
    return out
