"""ACEPipeline.generate: many requests per transformer call, each as its own call makes it.

The reference is ``ACEPipeline.__call__``, one request at a time with the same generator
(itself checked against an obvious denoising loop in test_pipeline.py)."""

import warnings

import numpy as np
import pytest
import torch

from ace.lcu import LCU, ConditionUnit
from ace.testing import tiny_pipeline
from tests._images import box_mask, img

STEPS = 3


# text-to-image, a masked edit, two inputs of other sizes with a negative prompt, and a
# second turn: every kind of frame layout in one batch
REQUESTS = [
    dict(instruction="a red circle", height=32, width=48),
    dict(instruction="make {image} blue", images=[img(32, 32)], masks=[box_mask(32, 32)]),
    dict(
        instruction="put {image} beside {image1}",
        images=[img(48, 32, 1), img(32, 64, 2)],
        negative_prompt="blurry",
    ),
    dict(
        instruction="and now {image} green",
        images=[img(32, 32, 3)],
        history=[dict(instruction="make {image} red", images=[img(32, 32, 4)])],
    ),
]


def gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def one_by_one(pipe, requests, **settings):
    return [
        pipe(**r, generator=g, **settings).images[0] for r, g in zip(requests, gens(len(requests)))
    ]


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for objective in ("ddpm-eps", "rectified-flow"):
        pipe = tiny_pipeline(seed=0, objective=objective)
        pipe.set_progress_bar_config(disable=True)
        out[objective] = pipe
    return out


@pytest.mark.parametrize("objective", ["ddpm-eps", "rectified-flow"])
@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_a_batch_gives_what_one_call_per_request_gives(pipes, objective, guidance_scale):
    pipe = pipes[objective]
    settings = dict(num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="np")
    want = one_by_one(pipe, REQUESTS, **settings)
    got = pipe.generate(REQUESTS, generator=gens(len(REQUESTS)), **settings).images
    assert len(got) == len(REQUESTS)
    for g, w in zip(got, want):
        assert g.shape == w.shape  # each at its own size: (32, 48), (32, 32), (32, 48) ...
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    # and not merely close to anything: the requests' images differ from one another
    assert not np.allclose(got[1], got[3], atol=1e-2)


def test_one_request_is_bitwise_the_call(pipes):
    pipe = pipes["ddpm-eps"]
    settings = dict(num_inference_steps=STEPS, output_type="np")
    for r in REQUESTS:
        want = pipe(**r, generator=torch.Generator().manual_seed(5), **settings).images[0]
        got = pipe.generate([r], generator=torch.Generator().manual_seed(5), **settings).images
        assert np.array_equal(got[0], want)


def test_batch_size_splits_the_requests_and_not_the_result(pipes):
    pipe = pipes["rectified-flow"]
    settings = dict(num_inference_steps=STEPS, output_type="np")
    whole = pipe.generate(REQUESTS, generator=gens(4), batch_size=8, **settings).images
    for batch_size in (1, 3):
        split = pipe.generate(REQUESTS, generator=gens(4), batch_size=batch_size, **settings)
        for a, b in zip(split.images, whole):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_lcus_pil_and_latent_outputs_and_one_shared_generator(pipes):
    pipe = pipes["ddpm-eps"]
    lcus = [
        LCU(ConditionUnit("make {image} blue", [img(32, 32)], [box_mask(32, 32)])),
        LCU(
            ConditionUnit("and {image} green", [img(32, 32, 3)]),
            history=[ConditionUnit("make {image} red", [img(32, 32, 4)])],
        ),
    ]
    dicts = [
        dict(
            instruction=x.current.instruction,
            images=x.current.images,
            masks=x.current.masks,
            history=x.history,
        )
        for x in lcus
    ]
    pil = pipe.generate(lcus, num_inference_steps=STEPS, generator=gens(2)).images
    assert [im.size for im in pil] == [(32, 32), (32, 32)]
    want = one_by_one(pipe, dicts, num_inference_steps=STEPS)
    assert all(
        np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
        for a, b in zip(pil, want)
    )
    latents = pipe.generate(dicts, num_inference_steps=STEPS, output_type="latent").images
    assert [tuple(x.shape) for x in latents] == [(1, 4, 4, 4), (1, 4, 4, 4)]


def test_one_generator_for_all_draws_as_calls_one_after_another(pipes):
    """DDIM's step draws nothing: the batch reads the shared generator request after
    request, as the same calls in a row read it."""
    pipe = pipes["ddpm-eps"]
    settings = dict(num_inference_steps=STEPS, output_type="np")
    shared = torch.Generator().manual_seed(1)
    want = [pipe(**r, generator=shared, **settings).images[0] for r in REQUESTS]
    got = pipe.generate(REQUESTS, generator=torch.Generator().manual_seed(1), **settings).images
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_latents_and_a_shifted_scheduler_are_each_requests_own():
    """A request's initial noise is used as given; each request samples with a copy of
    the pipeline's scheduler, settings made after loading (set_shift) included."""
    pipe = tiny_pipeline(seed=0, objective="rectified-flow")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_shift(5.0)
    noise = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(9))
    requests = [dict(REQUESTS[0], latents=noise), REQUESTS[1]]
    settings = dict(num_inference_steps=STEPS, output_type="np")
    want = one_by_one(pipe, requests, **settings)
    got = pipe.generate(requests, generator=gens(2), **settings).images
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    pipe.scheduler.set_shift(1.0)  # the shift matters: the call now differs
    assert not np.allclose(one_by_one(pipe, requests, **settings)[0], want[0], atol=1e-3)


def test_the_pipelines_own_scheduler_is_left_alone(pipes):
    pipe = pipes["ddpm-eps"]
    pipe.scheduler.set_timesteps(7)
    pipe.generate(REQUESTS[:2], num_inference_steps=2)
    assert len(pipe.scheduler.timesteps) == 7


@pytest.mark.parametrize(
    ("requests", "kwargs", "message"),
    [
        (dict(instruction="a star"), {}, "requests: expected a list of LCUs or dicts, got dict"),
        ([], {}, "requests: the list is empty"),
        (["a star"], {}, "request 0: expected an LCU or a dict, got str"),
        ([{"instruction": "a"}, {"prompt": "b"}], {}, r"request 1: unknown key\(s\) \['prompt'\]"),
        ([{"images": [img(32, 32)]}], {}, "request 0: no instruction"),
        ([{"instruction": "a", "height": 30, "width": 32}], {}, "request 0: height must be"),
        (
            [{"instruction": "a"}, {"instruction": "b", "height": 512, "width": 512}],
            {},
            "request 1: height x width = 512 x 512",
        ),
        ([{"instruction": "a", "negative_prompt": 3}], {}, "request 0: negative_prompt"),
        ([{"instruction": "a"}], {"generator": gens(2)}, "generator: got a list of 2 for 1"),
        ([{"instruction": "a"}], {"generator": 3}, "generator: expected a torch.Generator"),
        (
            [{"instruction": "a"}, {"instruction": "b"}],
            {"generator": [None, 7]},
            r"generator\[1\]: expected a torch.Generator or None, got int",
        ),
        (  # found while preparing the second request: named, like the checks before it
            [
                {"instruction": "a", "height": 32, "width": 32},
                {"instruction": "b", "height": 32, "width": 32, "latents": torch.zeros(1, 4, 3, 3)},
            ],
            {"num_inference_steps": 1},
            "request 1: latents shape",
        ),
        ([{"instruction": "a"}], {"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ([{"instruction": "a"}], {"num_inference_steps": 0}, "num_inference_steps"),
        ([{"instruction": "a"}], {"output_type": "tensor"}, "output_type"),
    ],
)
def test_bad_requests_name_the_request_and_the_problem(pipes, requests, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipes["ddpm-eps"].generate(requests, **kwargs)


def test_a_task_that_looks_like_inpainting_is_warned_as_in_a_call(pipes):
    request = dict(instruction="fill {image}", images=[img(32, 32)], task="inpaint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipes["ddpm-eps"].generate([request], num_inference_steps=1)
    hits = [w for w in caught if "not an inpainting tag" in str(w.message)]
    assert hits and hits[0].filename == __file__  # points at the caller's line
