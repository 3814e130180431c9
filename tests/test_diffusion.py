"""ace.diffusion against independent references written here (DDPM/DDIM equations, Euler)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ace.ddim import ScheduleDDIMScheduler, for_sampling
from ace.diffusion import (
    DDPMEpsilon,
    RectifiedFlow,
    apply_guidance,
    make_objective,
    objective_for_scheduler,
)


def _ref_abar() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def _eps_fn(x: torch.Tensor, t) -> torch.Tensor:
    return 0.1 * x + math.sin(float(t))


# ---------------------------------------------------------------- samplers


@pytest.mark.parametrize("k", [4, 20, 50])
def test_ddim_sampler_matches_hand_ddim(k):
    sched = DDPMEpsilon().make_scheduler()
    sched.set_timesteps(k)
    x0 = torch.randn(2, 4, 8, 8)
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(_eps_fn(x, t), t, x).prev_sample

    abar = _ref_abar()
    steps = [int(v) for v in torch.round(torch.arange(1000, 0, -1000 / k)) - 1]
    assert [int(t) for t in sched.timesteps] == steps
    ref = x0.double()
    for i, t in enumerate(steps):
        a_t = abar[t]
        a_prev = (
            abar[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
        )
        eps = _eps_fn(ref, t)
        x0_hat = (ref - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        ref = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    rel = (x.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("k", [3, 4, 7, 20, 30, 64, 999])
def test_sampling_ddim_matches_hand_ddim_at_any_step_count(k):
    """for_sampling's DDIM steps from each timestep of the schedule to the next (the last to
    alpha 1), as the hand loop does, also where k does not divide 1000; where it does, each
    step is DDIMScheduler.step's, bit for bit."""
    plain = DDPMEpsilon().make_scheduler()
    sched = for_sampling(plain)
    assert isinstance(sched, ScheduleDDIMScheduler) and sched is not plain
    sched.set_timesteps(k)
    plain.set_timesteps(k)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(k))
    x, same = x0.clone(), []
    for t in sched.timesteps:
        eps = _eps_fn(x, t)
        theirs = plain.step(eps, t, x).prev_sample  # diffusers' step from the same point
        x = sched.step(eps, t, x).prev_sample
        same.append(torch.equal(theirs, x))
    assert all(same) == (1000 % k == 0)

    abar, steps = _ref_abar(), [int(v) for v in sched.timesteps]
    ref = x0.double()
    for i, t in enumerate(steps):
        a_t = abar[t]
        a_prev = abar[steps[i + 1]] if i + 1 < k else torch.tensor(1.0, dtype=torch.float64)
        eps = _eps_fn(ref, t)
        x0_hat = (ref - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        ref = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    rel = (x.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("k", [6, 7, 15, 64])
def test_sampling_ddim_ends_on_the_data_of_a_point_mass(k):
    """Data that is one point c: the exact epsilon is known, and a DDIM loop must end on c.
    diffusers' DDIMScheduler ends at t = 0 when k does not divide 1000 (noise left)."""
    abar = _ref_abar()
    c = torch.full((1, 4, 4, 4), 0.3, dtype=torch.float64)
    ends = []
    for sched in (for_sampling(DDPMEpsilon().make_scheduler()), DDPMEpsilon().make_scheduler()):
        sched.set_timesteps(k)
        x = torch.randn(c.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in sched.timesteps:
            eps = (x - abar[t].sqrt() * c) / (1 - abar[t]).sqrt()
            x = sched.step(eps, t, x).prev_sample
        ends.append((x - c).abs().max().item())
    assert ends[0] < 1e-5 and ends[1] > 1e-3, ends


def test_sampling_ddim_refuses_a_timestep_off_its_schedule():
    sched = for_sampling(DDPMEpsilon().make_scheduler())
    sched.set_timesteps(7)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(
        ValueError, match=r"timestep 500 is not in the scheduler's timesteps \[999, 856"
    ):
        sched.step(x, 500, x)


def test_released_scheduler_config():
    cfg = DDPMEpsilon().make_scheduler().config
    assert isinstance(DDPMEpsilon().make_scheduler(), DDIMScheduler)
    expected = dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    assert {k: cfg[k] for k in expected} == expected
    assert (
        DDPMEpsilon().make_scheduler(timestep_spacing="leading").config.timestep_spacing
        == "leading"
    )


def test_flow_sampler_recovers_x0_on_straight_path():
    obj = RectifiedFlow()
    x0, noise = torch.randn(3, 16), torch.randn(3, 16)
    sched = obj.make_scheduler()
    sched.set_timesteps(7)
    x = noise.clone()
    for t in sched.timesteps:
        s = t / 1000
        v = (x - x0) / s  # on the path x = (1-s) x0 + s n this is exactly n - x0
        x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sampler_matches_hand_euler(shift):
    sched = RectifiedFlow(shift=shift).make_scheduler()
    # explicit base sigmas as Flux pipelines pass them; the scheduler applies the shift
    s = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)
    sched.set_timesteps(sigmas=s.float().numpy())
    sig = shift * s / (1 + (shift - 1) * s)
    sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sched.timesteps.double(), sig[:-1] * 1000, rtol=1e-6, atol=1e-4)

    def field(x, t):
        return torch.cos(x) + t / 1000

    x = torch.randn(2, 5)
    ref = x.double()
    for t in sched.timesteps:
        x = sched.step(field(x, t), t, x).prev_sample
    for i in range(10):
        ref = ref + (sig[i + 1] - sig[i]) * field(ref, sig[i] * 1000)
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- noising


def test_ddpm_add_noise_and_target():
    obj = DDPMEpsilon()
    x0, noise = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    t = torch.tensor([0.0, 1.0, 500.0, 998.0, 999.0])
    abar = _ref_abar()[t.long()].view(-1, 1, 1)
    ref = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    torch.testing.assert_close(obj.add_noise(x0, noise, t).double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(obj.target(x0, noise, t), noise)
    assert torch.equal(obj.model_timesteps(t), t)
    # same as diffusers' own DDPM add_noise (float32 schedule there)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(
        obj.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t.long()), rtol=1e-4, atol=1e-5
    )


def test_flow_add_noise_and_target():
    obj = RectifiedFlow(shift=2.0)
    x0, noise = torch.randn(4, 6), torch.randn(4, 6)
    s = torch.tensor([0.0, 0.25, 0.7, 1.0])
    ref = (1 - s[:, None]) * x0 + s[:, None] * noise
    torch.testing.assert_close(obj.add_noise(x0, noise, s), ref)
    torch.testing.assert_close(obj.target(x0, noise, s), noise - x0)
    torch.testing.assert_close(obj.model_timesteps(s), s * 1000)


def test_predict_x0_inverts_the_noising():
    """The exact target at x_t gives back x0; DDPM also against the formula by hand."""
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    flow = RectifiedFlow()
    s = torch.tensor([0.1, 0.5, 0.95])
    x_t = flow.add_noise(x0, noise, s)
    torch.testing.assert_close(flow.predict_x0(x_t, flow.target(x0, noise, s), s), x0)
    ddpm = DDPMEpsilon()
    t = torch.tensor([10.0, 500.0, 900.0])
    x_t = ddpm.add_noise(x0, noise, t)
    torch.testing.assert_close(ddpm.predict_x0(x_t, noise, t), x0, rtol=1e-4, atol=1e-4)
    # by hand: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), abar in float64
    abar = _ref_abar()[t.long()].view(-1, 1, 1)
    ref = (x_t.double() - (1 - abar).sqrt() * noise.double()) / abar.sqrt()
    torch.testing.assert_close(ddpm.predict_x0(x_t, noise, t).double(), ref, rtol=1e-5, atol=1e-5)
    # bf16 in and out, the arithmetic in float32 as add_noise does it
    half = ddpm.predict_x0(x_t.bfloat16(), noise.bfloat16(), t)
    by_hand = (
        x_t.bfloat16().double() - (1 - abar).sqrt() * noise.bfloat16().double()
    ) / abar.sqrt()
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), by_hand.bfloat16().double(), rtol=1e-2, atol=1e-2)


def test_sample_timesteps():
    ddpm = DDPMEpsilon()
    t = ddpm.sample_timesteps(4096, generator=torch.Generator().manual_seed(1))
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 999
    assert t.max() > 900 and t.min() < 100
    t2 = ddpm.sample_timesteps(4096, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, t2)

    s1 = RectifiedFlow().sample_timesteps(4096, generator=torch.Generator().manual_seed(2))
    s3 = RectifiedFlow(shift=3.0).sample_timesteps(4096, generator=torch.Generator().manual_seed(2))
    assert ((s1 > 0) & (s1 < 1)).all() and ((s3 > 0) & (s3 < 1)).all()
    assert abs(s1.mean().item() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric about 1/2
    assert (s3 >= s1).all() and s3.mean() > s1.mean() + 0.1
    # same draws -> shifted by hand
    torch.testing.assert_close(s3, 3 * s1 / (1 + 2 * s1))
    # logit-normal: logit(s) ~ N(mean, std)
    z = torch.logit(
        RectifiedFlow(logit_mean=0.5, logit_std=2.0)
        .sample_timesteps(8192, generator=torch.Generator().manual_seed(3))
        .double()
    )
    assert abs(z.mean().item() - 0.5) < 0.1 and abs(z.std().item() - 2.0) < 0.1


# ---------------------------------------------------------------- loss


def _ragged():
    sizes = [3, 7, 1]
    x0 = torch.randn(sum(sizes), 8)
    index = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    return sizes, x0, index


@pytest.mark.parametrize("obj", [DDPMEpsilon(), RectifiedFlow(shift=3.0)], ids=lambda o: o.name)
def test_loss_zero_model_is_per_sample_mean_of_target_sq(obj):
    sizes, x0, index = _ragged()
    calls = []

    def zero_model(x_t, t):
        calls.append((x_t, t))
        return torch.zeros_like(x_t)

    loss = obj.loss(zero_model, x0, index, 3, generator=torch.Generator().manual_seed(5))
    assert loss.ndim == 0 and len(calls) == 1
    # replay the documented draws: t (B,) then noise like x0
    g = torch.Generator().manual_seed(5)
    t = obj.sample_timesteps(3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(calls[0][1], obj.model_timesteps(t))
    torch.testing.assert_close(calls[0][0], obj.add_noise(x0, noise, t[index]))
    target = obj.target(x0, noise, t[index]).double()
    per_sample, start = [], 0
    for n in sizes:
        per_sample.append(target[start : start + n].square().mean())
        start += n
    torch.testing.assert_close(loss.double(), torch.stack(per_sample).mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("obj", [DDPMEpsilon(), RectifiedFlow()], ids=lambda o: o.name)
def test_loss_exact_model_is_zero_and_equal_sizes_plain_mean(obj):
    _, x0, index = _ragged()
    g = torch.Generator().manual_seed(9)
    t = obj.sample_timesteps(3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    target = obj.target(x0, noise, t[index])
    loss = obj.loss(lambda x_t, t: target, x0, index, 3, generator=torch.Generator().manual_seed(9))
    assert loss.item() < 1e-12

    x0 = torch.randn(12, 8)
    index = torch.arange(3).repeat_interleave(4)
    pred = torch.randn(12, 8)
    g = torch.Generator().manual_seed(4)
    t = obj.sample_timesteps(3, generator=g)
    target = obj.target(x0, torch.randn(x0.shape, generator=g), t[index])
    loss = obj.loss(lambda x_t, t: pred, x0, index, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))


def test_loss_backward_reaches_model_params():
    _, x0, index = _ragged()
    net = torch.nn.Linear(8, 8)
    for obj in (DDPMEpsilon(), RectifiedFlow()):
        net.zero_grad()
        loss = obj.loss(lambda x_t, t: net(x_t) * t[index, None] / 1000, x0, index, 3)
        loss.backward()
        assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- guidance


def test_guidance_rescale_of_a_constant_prediction_is_finite():
    """A sample whose guided prediction has no spread (a fresh model predicts 0) is scaled
    by 1 - rescale, not divided by std 0 into NaN; the other samples are untouched."""
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    c[1], u[1] = 0.0, 0.0
    c[2], u[2] = 0.25, 0.25  # constant, not zero
    out = apply_guidance(c, u, 4.5, 0.5)
    assert torch.equal(out[1], torch.zeros(4, 2, 2))
    torch.testing.assert_close(out[2], torch.full((4, 2, 2), 0.125))
    torch.testing.assert_close(out[:1], apply_guidance(c[:1], u[:1], 4.5, 0.5))


@pytest.mark.parametrize("rescale", [0.0, 0.5, 1.0])
def test_apply_guidance_matches_released_rule(rescale):
    c, u = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    scale = 4.5
    eps = u + scale * (c - u)
    std_c = c.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # unbiased, per sample
    std_e = eps.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    ref = eps * (rescale * std_c / std_e + (1 - rescale))
    torch.testing.assert_close(apply_guidance(c, u, scale, rescale), ref)
    half = apply_guidance(c.half(), u.half(), scale, rescale)
    assert half.dtype == torch.float16


# ---------------------------------------------------------------- factory and errors


def test_make_objective_and_scheduler_round_trip(tmp_path):
    assert isinstance(make_objective("ddpm-eps"), DDPMEpsilon)
    flow = make_objective("rectified-flow", shift=3.0)
    assert isinstance(flow, RectifiedFlow) and flow.shift == 3.0
    for obj in (DDPMEpsilon(), DDPMEpsilon(beta_end=0.012, beta_schedule="scaled_linear"), flow):
        assert objective_for_scheduler(obj.make_scheduler()) == obj
        assert make_objective(obj.name) == type(obj)()
    ddpm = DDPMScheduler(beta_start=1e-4, beta_end=0.02)
    assert objective_for_scheduler(ddpm) == DDPMEpsilon()
    sched = FlowMatchEulerDiscreteScheduler(shift=2.5)
    assert objective_for_scheduler(sched) == RectifiedFlow(shift=2.5)
    # a scheduler loaded from disk says what its model predicts
    flow.make_scheduler().save_pretrained(tmp_path / "flow")
    DDPMEpsilon().make_scheduler().save_pretrained(tmp_path / "ddim")
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "flow")
    assert objective_for_scheduler(loaded) == flow
    assert (
        objective_for_scheduler(DDIMScheduler.from_pretrained(tmp_path / "ddim")) == DDPMEpsilon()
    )


def test_errors():
    obj, x = DDPMEpsilon(), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="valid names"):
        make_objective("edm")
    with pytest.raises(ValueError, match="integers in"):
        obj.add_noise(x, x, torch.tensor([0.0, 1000.0]))
    with pytest.raises(ValueError, match="integers in"):
        obj.add_noise(x, x, torch.tensor([-1.0, 3.0]))
    with pytest.raises(ValueError, match="integers in"):
        obj.add_noise(x, x, torch.tensor([0.5, 3.0]))
    with pytest.raises(ValueError, match="must be"):
        obj.add_noise(x, x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        obj.add_noise(x, torch.zeros(2, 4), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RectifiedFlow().add_noise(x, x, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMEpsilon(beta_schedule="cosine")
    with pytest.raises(ValueError, match="shift"):
        RectifiedFlow(shift=0.0)
    with pytest.raises(ValueError, match="sample_index"):
        obj.loss(lambda a, b: a, x, torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="model_fn returned"):
        obj.loss(lambda a, b: a[:1], x, torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="guidance scale"):
        apply_guidance(x, x, -1.0)
    with pytest.raises(ValueError, match="rescale"):
        apply_guidance(x, x, 4.5, rescale=1.5)
    with pytest.raises(ValueError, match="differ"):
        apply_guidance(x, torch.zeros(2, 4), 4.5)
    with pytest.raises(ValueError, match="epsilon prediction"):
        objective_for_scheduler(DDIMScheduler(prediction_type="v_prediction"))
    # predict_x0 checks its times as add_noise does: t = -1 read abar[999] silently
    with pytest.raises(ValueError, match="integers in"):
        obj.predict_x0(x, x, torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RectifiedFlow().predict_x0(x, x, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="differ in shape"):
        obj.predict_x0(x, torch.zeros(2, 4), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # NaN passed (t < 0) | (t > 1)
        RectifiedFlow().add_noise(x, x, torch.tensor([float("nan"), 0.5]))
    for scale, rescale in [(None, 0.5), (4.5, None), (True, 0.5), ("4.5", 0.5)]:
        with pytest.raises(ValueError, match="must be a number"):  # TypeError for None before
            apply_guidance(x, x, scale, rescale)
