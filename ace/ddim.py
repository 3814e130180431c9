"""The released DDIM sampler at any step count.

diffusers' ``DDIMScheduler.step`` goes from timestep t to ``t - num_train_timesteps // n``.
With trailing spacing and n dividing 1000 (the released 20 and 50 steps) that is the next
timestep of the schedule, and the released loop is reproduced exactly (ACE_REFERENCE
section 1). For any other n it is not: at 7 steps the schedule is 999, 856, 713, ..., 142
while each step lands 142 lower (999 -> 857, evaluated at 856), and the last step ends at
t = 0, not at the clean sample (alpha 1), leaving about 0.01 of the noise in the image
(diffusers issues #9261 and #12633).

``ScheduleDDIMScheduler`` steps from each timestep of its schedule to the next (alpha 1 after
the last), through ``DDIMScheduler.step`` itself: where the two rules agree it is that call
unchanged, bit for bit; elsewhere the same call reads the alpha of the step's true end.
The pipeline samples with it (``for_sampling``) whatever DDIM scheduler it holds.
"""

from __future__ import annotations

import copy

from diffusers import DDIMScheduler, SchedulerMixin
from torch import Tensor


class ScheduleDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` whose step ends at the next timestep of its schedule (module docstring)."""

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *args, **kwargs):
        if self.num_inference_steps is None:
            return super().step(model_output, timestep, sample, *args, **kwargs)  # its error
        t = int(timestep)
        schedule = self.timesteps.tolist()  # python ints: no per-step reads of tensor values
        if t not in schedule:
            raise ValueError(f"timestep {t} is not in the scheduler's timesteps {schedule}")
        i = schedule.index(t)
        end = schedule[i + 1] if i + 1 < len(schedule) else -1  # -1: the final alpha
        stride = self.config.num_train_timesteps // self.num_inference_steps
        if t - stride == end or (t - stride < 0 and end < 0):
            return super().step(model_output, timestep, sample, *args, **kwargs)
        # DDIMScheduler.step reads the step's end alpha at t - stride (the final alpha below 0):
        # for this one call both hold the alpha of the true end
        table, final = self.alphas_cumprod, self.final_alpha_cumprod
        alpha = table[end] if end >= 0 else final
        patched = table.clone()
        if t - stride >= 0:
            patched[t - stride] = alpha
        self.alphas_cumprod, self.final_alpha_cumprod = patched, alpha
        try:
            return super().step(model_output, timestep, sample, *args, **kwargs)
        finally:
            self.alphas_cumprod, self.final_alpha_cumprod = table, final


def for_sampling(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A copy of ``scheduler`` for one sampling run (a scheduler keeps the state of its
    steps): a plain ``DDIMScheduler`` becomes a ``ScheduleDDIMScheduler`` of its config."""
    if type(scheduler) is DDIMScheduler:
        return ScheduleDDIMScheduler.from_config(scheduler.config)
    return copy.deepcopy(scheduler)
