"""Training objectives, sampler factory and classifier-free guidance.

The model knows nothing of diffusion: an objective wraps any ``model_fn(x_t, t) -> pred``
through one narrow call (minRF ``rf.py``, DiT ``training_losses``), and sampling uses a
diffusers scheduler made by the objective, so training and sampling agree.

Shapes: N target tokens of a packed batch (all samples); D = p*p*C values per token;
B samples (``num_samples``); ``sample_index`` (N,) long gives the sample of each row.
Times ``t`` are per sample (B,) in training and per row (N,) inside ``add_noise``.

- ``DDPMEpsilon``: the released recipe. t integer in {0..T-1}, x_t = sqrt(abar_t) x0 +
  sqrt(1 - abar_t) noise, target = noise; sampled with DDIM (eta 0, trailing spacing).
- ``RectifiedFlow``: diffusers flow-matching convention. s in (0, 1), x_t = (1 - s) x0
  + s noise, target v = noise - x0; s logit-normal (SD3) then shifted; the network sees
  s * T; sampled with ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

try:  # diffusers >= 0.35 (no transformers import)
    from diffusers.guiders.guider_utils import rescale_noise_cfg
except ImportError:  # older diffusers
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

Gen = torch.Generator | None
ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (N, D), model timesteps (B,)) -> (N, D)


def _randn(shape: tuple[int, ...], generator: Gen, device) -> Tensor:
    """Float32 normal draws on the generator's device (so any generator works), then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _per_row(t: Tensor, x: Tensor) -> Tensor:
    """(N,) per-row values -> (N, 1, ..., 1) broadcastable against x (N, ...)."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be ({x.shape[0]},) for x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class Objective(ABC):
    """Noising process + training loss; subclasses fill in the per-process pieces."""

    name: str
    """Registry name ("ddpm-eps" / "rectified-flow")."""

    @abstractmethod
    def sample_timesteps(self, n: int, generator: Gen = None, device=None) -> Tensor:
        """(n,) float training times."""

    @abstractmethod
    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the network's timestep embedding receives for times t."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The network's regression target for (x0, noise, t)."""

    @abstractmethod
    def make_scheduler(self, **overrides: Any):
        """A diffusers scheduler that samples what this objective trains."""

    @abstractmethod
    def _check_t(self, t: Tensor) -> None:
        """Raise ValueError for times outside the process (a host sync: public calls only)."""

    @abstractmethod
    def _noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``add_noise`` without checks."""

    @abstractmethod
    def _predict_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """``predict_x0`` without checks."""

    def predict_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """The clean sample the network's output ``pred`` implies at x_t (N, ...), t (N,)."""
        if x_t.shape != pred.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and pred {tuple(pred.shape)} differ in shape")
        self._check_t(t)
        return self._predict_x0(x_t, pred, t)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x0, noise (N, ...), t (N,) -> x_t (N, ...)."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
        self._check_t(t)
        return self._noise(x0, noise, t)

    def loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        sample_index: Tensor,
        num_samples: int,
        generator: Gen = None,
    ) -> Tensor:
        """Scalar MSE: mean over each sample's rows and values, then over samples.

        Draws t (num_samples,) first, then noise like x0 (N, D), both from ``generator``.
        Calls ``model_fn(x_t, model_timesteps(t))`` once. Samples without rows are skipped.
        """
        if x0.ndim < 2 or sample_index.shape != x0.shape[:1]:
            shapes = f"{tuple(x0.shape)} and {tuple(sample_index.shape)}"
            raise ValueError(f"x0 must be (N, D) and sample_index (N,), got {shapes}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        t = self.sample_timesteps(num_samples, generator=generator, device=x0.device)  # (B,)
        noise = _randn(tuple(x0.shape), generator, x0.device).to(x0.dtype)  # (N, D)
        t_row = t[sample_index]  # (N,)
        pred = model_fn(self._noise(x0, noise, t_row), self.model_timesteps(t))  # (N, D)
        if pred.shape != x0.shape:
            raise ValueError(f"model_fn returned {tuple(pred.shape)}, expected {tuple(x0.shape)}")
        err = (pred.float() - self.target(x0, noise, t_row).float()).square()  # (N, D)
        row_err = err.reshape(err.shape[0], -1).mean(dim=1)  # (N,)
        zeros = row_err.new_zeros(num_samples)
        sums = zeros.index_add(0, sample_index, row_err)  # (B,)
        counts = zeros.index_add(0, sample_index, torch.ones_like(row_err))  # (B,) no host sync
        per_sample = sums / counts.clamp(min=1)  # (B,)
        return per_sample.sum() / (counts > 0).sum().clamp(min=1)


@dataclass
class DDPMEpsilon(Objective):
    """Epsilon prediction on a discrete DDPM schedule (the released ACE recipe)."""

    num_train_timesteps: int = 1000
    """T: number of discrete training steps; t in {0..T-1}."""
    beta_start: float = 1e-4
    """beta_0 of the schedule."""
    beta_end: float = 0.02
    """beta_{T-1} of the schedule."""
    beta_schedule: str = "linear"
    """"linear" (released) or "scaled_linear" (Stable Diffusion)."""
    name: str = field(default="ddpm-eps", init=False)
    """Registry name, fixed."""
    _abar: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Cache: device -> alphas_cumprod (T,) float64 (float32 on MPS)."""

    def __post_init__(self) -> None:
        n, lo, hi = self.num_train_timesteps, self.beta_start, self.beta_end
        if n < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {n}")
        if self.beta_schedule == "linear":
            betas = torch.linspace(lo, hi, n, dtype=torch.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(lo**0.5, hi**0.5, n, dtype=torch.float64) ** 2
        else:
            raise ValueError(
                f"beta_schedule must be linear or scaled_linear: {self.beta_schedule!r}"
            )
        self._abar[torch.device("cpu")] = torch.cumprod(1.0 - betas, dim=0)  # (T,)

    def alphas_cumprod(self, device=None) -> Tensor:
        """abar (T,) on ``device``, cached per device."""
        device = torch.device(device if device is not None else "cpu")
        if device not in self._abar:
            dtype = torch.float32 if device.type == "mps" else None  # MPS has no float64
            self._abar[device] = self._abar[torch.device("cpu")].to(device, dtype)
        return self._abar[device]

    def sample_timesteps(self, n: int, generator: Gen = None, device=None) -> Tensor:
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=gen_device)
        return t.to(device=device, dtype=torch.float32)  # (n,) integer values

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t

    def _check_t(self, t: Tensor) -> None:
        bad = (t < 0) | (t >= self.num_train_timesteps) | (t != t.round())
        if bool(bad.any()):
            raise ValueError(
                f"DDPM timesteps must be integers in [0, {self.num_train_timesteps - 1}]"
            )

    def _noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod(x0.device)[t.long()]  # (N,) float64: coefficients exact
        dtype = torch.promote_types(x0.dtype, torch.float32)  # the big tensors stay float32
        a = _per_row(abar.sqrt().to(dtype), x0)  # (N, 1...)
        b = _per_row((1 - abar).sqrt().to(dtype), x0)  # (N, 1...)
        return (a * x0 + b * noise).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise

    def _predict_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps  =>  x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        abar = self.alphas_cumprod(x_t.device)[t.long()]  # (N,)
        dtype = torch.promote_types(x_t.dtype, torch.float32)  # as _noise: no bf16 coefficients
        a, b = (_per_row(v.to(dtype), x_t) for v in (abar.sqrt(), (1 - abar).sqrt()))
        return ((x_t.to(dtype) - b * pred.to(dtype)) / a).to(x_t.dtype)

    def make_scheduler(self, **overrides: Any) -> DDIMScheduler:
        """The released sampler: DDIM, eta 0, trailing spacing, final alpha 1."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
        config = {k: getattr(self, k) for k in keys}
        config.update(clip_sample=False, set_alpha_to_one=True, steps_offset=0)
        config.update(prediction_type="epsilon", timestep_spacing="trailing")
        return DDIMScheduler(**{**config, **overrides})


@dataclass
class RectifiedFlow(Objective):
    """Velocity prediction on the straight path x_t = (1 - s) x0 + s noise."""

    num_train_timesteps: int = 1000
    """The network's timestep input is s * num_train_timesteps."""
    shift: float = 1.0
    """Time shift s' = shift*s / (1 + (shift-1)*s); > 1 favours noisier times."""
    logit_mean: float = 0.0
    """Mean of the logit-normal training times (SD3)."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal training times (SD3)."""
    name: str = field(default="rectified-flow", init=False)
    """Registry name, fixed."""

    def __post_init__(self) -> None:
        if self.shift <= 0 or self.logit_std <= 0:
            raise ValueError(f"shift and logit_std must be > 0: {self.shift}, {self.logit_std}")

    def sample_timesteps(self, n: int, generator: Gen = None, device=None) -> Tensor:
        z = self.logit_mean + self.logit_std * _randn((n,), generator, device)  # (n,)
        s = torch.sigmoid(z)  # (n,) logit-normal in (0, 1)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def _check_t(self, t: Tensor) -> None:
        if bool((~((t >= 0) & (t <= 1))).any()):  # NaN fails too
            raise ValueError("flow times s must lie in [0, 1]")

    def _noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = _per_row(t, x0).to(x0.dtype)  # (N, 1...)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def _predict_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        # x_t = x0 + s (noise - x0) = x0 + s v  =>  x0 = x_t - s v
        return x_t - _per_row(t, x_t).to(x_t.dtype) * pred

    def make_scheduler(self, **overrides: Any) -> FlowMatchEulerDiscreteScheduler:
        config = dict(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        return FlowMatchEulerDiscreteScheduler(**{**config, **overrides})


OBJECTIVES: dict[str, type[Objective]] = {"ddpm-eps": DDPMEpsilon, "rectified-flow": RectifiedFlow}


def make_objective(name: str, **kwargs: Any) -> Objective:
    """Objective by registry name ("ddpm-eps" or "rectified-flow"), fields as kwargs."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def objective_for_scheduler(scheduler) -> Objective:
    """The objective a loaded scheduler samples: FlowMatch* -> flow, beta schedules -> DDPM."""
    cfg = scheduler.config
    if type(scheduler).__name__.startswith("FlowMatch"):
        return RectifiedFlow(cfg.num_train_timesteps, shift=cfg.get("shift", 1.0))
    if "beta_start" in cfg and "beta_end" in cfg:
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"only epsilon prediction is supported, not {cfg.prediction_type!r}")
        if cfg.get("trained_betas") is not None:
            raise ValueError("schedulers with trained_betas are not supported")
        return DDPMEpsilon(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            beta_schedule=cfg.get("beta_schedule", "linear"),
        )
    raise ValueError(f"no objective matches scheduler {type(scheduler).__name__}")


def check_guidance(scale: float, rescale: float) -> None:
    """The released ranges: guidance scale >= 0 and finite, guidance rescale in [0, 1]
    (NaN refused). The pipeline samples a scale <= 1 without guidance."""
    for name, value in (("scale", scale), ("rescale", rescale)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"guidance {name} must be a number, got {value!r}")
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"guidance scale must be finite and >= 0, got {scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")


def apply_guidance(cond: Tensor, uncond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance with guidance rescale (released rule).

    cond, uncond (B, ...) -> eps = u + scale (c - u); if rescale > 0, diffusers'
    ``rescale_noise_cfg``: eps *= rescale * std(c) / std(eps) + (1 - rescale), std per
    sample over all its other elements (unbiased), computed in float32.
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ")
    if cond.ndim < 2:
        raise ValueError(f"guidance needs a (B, ...) sample dim, got {tuple(cond.shape)}")
    check_guidance(scale, rescale)
    eps = uncond + scale * (cond - uncond)  # (B, ...)
    if rescale == 0.0:
        return eps
    out = rescale_noise_cfg(eps.float(), cond.float(), guidance_rescale=rescale)
    # diffusers divides by std(eps) unguarded: a sample whose guided prediction is constant
    # (a freshly initialised model predicts exactly 0) would be NaN. There it is scaled by
    # 1 - rescale, the released rule's value where std(c) is 0 too (its std(eps) + 1e-12)
    flat = eps.float().flatten(1).std(dim=1) == 0  # (B,)
    flat = flat.reshape(-1, *[1] * (eps.ndim - 1))  # (B, 1, ...)
    return torch.where(flat, eps.float() * (1 - rescale), out).to(eps.dtype)
