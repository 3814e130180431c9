"""ACEPipeline on the tiny random pipeline: behaviour, errors, save/load, chat, and one
denoising run checked against an obvious loop written here from ACE_REFERENCE."""

import copy

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from ace.conditioning import ConditionTokenizer, downsample_mask, preprocess_image
from ace.diffusion import RectifiedFlow
from ace.lcu import LCU, ConditionUnit
from ace.pipeline import ACEPipeline
from ace.request import prepare_lcu
from ace.testing import tiny_pipeline
from tests._images import box_mask, img

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def run(pipe, instruction, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(instruction, generator=torch.Generator().manual_seed(seed), **kw).images[0]


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_text_to_image_at_requested_size(pipe):
    out = run(pipe, "a red circle at the top left", height=48, width=80)
    assert isinstance(out, Image.Image) and out.size == (80, 48)
    assert pipe.default_size == 256  # tiny preset: 256 tokens -> 16 x 16 tokens of 16 px


def test_a_factor_4_vae_resizes_to_what_the_dit_takes():
    """The resize counted 16 px a token (the released VAE's 8 x patch 2). With the toy
    VAE's factor 4 a token is 8 px: the default size was 4 times the DiT's 256 tokens,
    and any input over 128 px was refused ("larger than rope_max_len")."""
    from diffusers import AutoencoderKL

    from ace.testing import tiny_pipeline
    from ace.train.vae import toy_vae_config

    pipe = tiny_pipeline()
    pipe.vae = AutoencoderKL(**toy_vae_config(latent_channels=4)).eval()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.conditioner.vae_factor == 4 and pipe.max_seq_len == 64
    assert pipe.default_size == 128  # 16 x 16 tokens of 8 px: rope_max_len = 256
    assert run(pipe, "a red circle").size == (128, 128)
    photo = Image.new("RGB", (400, 300), (200, 30, 30))
    out = run(pipe, "make {image} blue", images=[photo])
    w, h = out.size
    assert (w // 8) * (h // 8) <= 256 and w / h == pytest.approx(4 / 3, rel=0.15)


def test_masked_edit_keeps_input_size(pipe):
    out = run(
        pipe, "fill the box in {image} with blue", images=[img(80, 48)], masks=[box_mask(80, 48)]
    )
    assert out.size == (80, 48)


def test_two_reference_images(pipe):
    out = run(
        pipe, "put the object of {image1} into {image}", images=[img(64, 48, 1), img(32, 32, 2)]
    )
    assert out.size == (64, 48)  # the target takes the first image's size


def test_history_changes_the_result(pipe):
    history = [ConditionUnit("make {image} red", [img(48, 48, 3)])]
    with_history = run(pipe, "now make {image} round", images=[img(48, 48, 4)], history=history)
    without = run(pipe, "now make {image} round", images=[img(48, 48, 4)])
    assert with_history.size == (48, 48) and not same(with_history, without)


def test_seed_guidance_and_latents_control_the_output(pipe):
    kw = dict(height=32, width=32)
    a, b, c = (
        run(pipe, "a star", 1, **kw),
        run(pipe, "a star", 1, **kw),
        run(pipe, "a star", 2, **kw),
    )
    assert same(a, b) and not same(a, c)
    assert not same(a, run(pipe, "a star", 1, guidance_scale=1.5, **kw))
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    x1 = pipe("a star", latents=noise, num_inference_steps=STEPS, output_type="latent", **kw).images
    x2 = pipe(
        "a star", latents=noise.clone(), num_inference_steps=STEPS, output_type="latent", **kw
    ).images
    assert x1.shape == (1, 4, 4, 4) and torch.equal(x1, x2)
    arr = pipe("a star", latents=noise, num_inference_steps=STEPS, output_type="np", **kw).images
    assert arr.shape == (1, 32, 32, 3) and arr.min() >= 0 and arr.max() <= 1


def test_save_and_load_give_identical_output(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "pipe" / "indicators" / "diffusion_pytorch_model.safetensors").exists()
    loaded = ACEPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(loaded.indicators.table, pipe.indicators.table)
    kw = dict(images=[img(48, 32, 6)], masks=[box_mask(48, 32)])
    assert same(run(pipe, "paint {image} green", **kw), run(loaded, "paint {image} green", **kw))
    half = ACEPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    assert run(half, "a star", height=32, width=32).size == (32, 32)


def test_to_and_model_cpu_offload_keep_working(pipe):
    expected = run(pipe.to("cpu"), "a star", height=32, width=32)
    offloaded = tiny_pipeline(seed=0)
    offloaded.enable_model_cpu_offload(device="cpu")  # the hooks diffusers installs for small GPUs
    assert same(run(offloaded, "a star", height=32, width=32), expected)


def test_conditioner_sends_inputs_to_the_execution_device(monkeypatch):
    """Under enable_model_cpu_offload() the components wait on the CPU while the pipeline
    runs on the accelerator, and diffusers' hooks on the VAE's encode and decode move the
    module but not its inputs: the conditioner must send every input to the pipeline's
    execution device itself, not to where a component happens to be."""
    pipe = tiny_pipeline()
    meta, seen = torch.device("meta"), {}

    class Stop(Exception):
        pass

    def spy(name):
        def record(*args, **kwargs):
            seen[name] = (args[0] if args else kwargs["input_ids"]).device
            raise Stop

        return record

    monkeypatch.setattr(pipe.text_encoder, "forward", spy("text"))
    monkeypatch.setattr(pipe.vae, "encode", spy("encode"))
    monkeypatch.setattr(pipe.vae, "decode", spy("decode"))
    enc = ConditionTokenizer(pipe.tokenizer, pipe.text_encoder, pipe.vae, device=meta)
    calls = (
        lambda: enc.encode_text(["make it blue"]),
        lambda: enc.encode_images([torch.zeros(3, 64, 64)]),
        lambda: enc.decode(torch.zeros(1, 4, 8, 8)),
    )
    for call in calls:
        with pytest.raises(Stop):
            call()
    assert seen == {"text": meta, "encode": meta, "decode": meta}  # the components are on CPU
    assert pipe.conditioner.device == pipe._execution_device


def test_vae_tiling_encodes_and_decodes_large_images_in_tiles(monkeypatch):
    """pipe.vae.enable_tiling() (diffusers) reaches the pipeline's VAE calls: an edit
    larger than a tile (the tiny VAE's 64 px) goes through the tiled encode and decode."""
    tiled = tiny_pipeline(seed=0)
    calls = []
    for name in ("_tiled_encode", "tiled_decode"):
        original = getattr(tiled.vae, name)
        monkeypatch.setattr(
            tiled.vae, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    request = dict(instruction="make {image} blue", images=[img(128, 96)])
    run(tiled, **request)
    assert calls == []  # off by default
    tiled.vae.enable_tiling()
    out = run(tiled, **request)
    assert calls == ["_tiled_encode", "tiled_decode"] and out.size == (128, 96)


def test_inpainting_fill_only_for_inpainting_requests(pipe):
    kw = dict(images=[img(32, 32, 10)], masks=[box_mask(32, 32)])
    plain = run(pipe, "fill {image}", **kw)
    assert not same(plain, run(pipe, "fill {image}", task="inpainting", **kw))
    assert same(run(pipe, "fill {image}", task="inpainting", **kw), run(pipe, "fill {image}", task="Try On", **kw))  # fmt: skip


def test_a_task_that_looks_like_inpainting_but_is_not_is_warned(pipe):
    with pytest.warns(UserWarning, match=r"task='inpaint' is not an inpainting tag") as caught:
        pipe("fill {image}", images=[img(32, 32)], task="inpaint", num_inference_steps=1)
    assert caught[0].filename == __file__  # the caller's line, not no_grad's wrapper


def test_an_inpainting_turn_without_masks_is_refused(pipe):
    """The released fill blanks an unmasked image wholly, so an inpainting request with no
    mask would ignore its input: refused for the current turn and for history turns
    (scripts/infer.py refused it already; prepare_lcu, for training data, still fills)."""
    with pytest.raises(ValueError, match=r"^task='inpainting' fills .* but it has no masks"):
        pipe("fill {image}", images=[img(32, 32)], task="inpainting", num_inference_steps=1)
    turn = {"instruction": "fill {image}", "images": [img(32, 32)], "task": "Try On"}
    with pytest.raises(ValueError, match=r"^request 1: history\[0\]: task='Try On' fills"):
        pipe.generate([{"instruction": "a"}, {"instruction": "b", "history": [turn]}], num_inference_steps=1)  # fmt: skip
    masked = {**turn, "masks": [box_mask(32, 32)]}
    pipe("now blue", history=[masked], height=32, width=32, num_inference_steps=1)


def test_call_inputs_of_the_wrong_kind_are_named(pipe):
    """Each was an AttributeError or IndexError from inside the sampler."""
    for bad in (0, "cpu"):
        with pytest.raises(ValueError, match=r"generator: expected a torch\.Generator"):
            pipe("a", generator=bad, height=32, width=32, num_inference_steps=1)
    three = dict(images=[img(32, 32)] * 3, num_inference_steps=1)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(ValueError, match="generator: got a list of 2 for 1 requests"):
        pipe("e {image} {image1} {image2}", generator=gens, **three)
    edit = dict(images=[img(32, 32)], num_inference_steps=1)
    one = pipe("e {image}", generator=[torch.Generator().manual_seed(5)], **edit).images[0]
    assert same(
        one, pipe("e {image}", generator=torch.Generator().manual_seed(5), **edit).images[0]
    )
    with pytest.raises(
        ValueError, match=r"latents: expected a torch tensor \(1, 4, 4, 4\), got ndarray"
    ):
        pipe("a", latents=np.zeros((1, 4, 4, 4), np.float32), height=32, width=32)
    with pytest.raises(ValueError, match=r"num_inference_steps=1001, but the scheduler has 1000"):
        pipe.generate([{"instruction": "a"}], num_inference_steps=1001)
    # which input: an LCU may hold nine
    with pytest.raises(ValueError, match=r"^history\[0\] images\[0\]: image of size \(8, 8\) is too small"):  # fmt: skip
        pipe("e {image}", images=[img(32, 32)], history=[{"instruction": "x", "images": [img(8, 8)]}])  # fmt: skip
    with pytest.raises(ValueError, match=r"^images\[1\]: image tensor: .*\(0-255 values\? divide by 255\)"):  # fmt: skip
        pipe("e {image}", images=[img(32, 32), torch.full((3, 32, 32), 200.0)])
    # a history turn's images may be None, as the call's own (none)
    pipe("a", history=[{"instruction": "b", "images": None}], height=32, width=32, num_inference_steps=1)  # fmt: skip


def test_warnings_about_a_request_point_at_the_callers_line(pipe):
    """Cut instructions are said so (T5 reads 120 tokens), and every warning about a
    request names the user's line, from __call__ and generate alike."""
    long = "a red circle " * 60
    with pytest.warns(UserWarning, match=r"instruction is \d+ tokens long; the text encoder reads the first 120") as caught:  # fmt: skip
        pipe(long, height=32, width=32, num_inference_steps=1)
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match=r"history\[0\] is \d+ tokens long") as caught:
        pipe.generate([{"instruction": "b", "history": [{"instruction": long}], "height": 32, "width": 32}], num_inference_steps=1)  # fmt: skip
    assert caught[0].filename == __file__
    faint = Image.new("L", (32, 32), 100)  # marks pixels, none above 128
    with pytest.warns(UserWarning, match="none above 128") as caught:
        pipe("e {image}", images=[img(32, 32)], masks=[faint], num_inference_steps=1)
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match="none above 128") as caught:
        pipe.generate([{"instruction": "e {image}", "images": [img(32, 32)], "masks": [faint]}], num_inference_steps=1)  # fmt: skip
    assert caught[0].filename == __file__


def test_inpainting_blanks_an_unmasked_current_image_wholly_as_released():
    """Released process_edit_image: a missing mask is all-zero, hence all-ones, and an
    inpainting task sets every masked pixel to -1, so the whole image."""
    hist, cur = img(32, 32, 3), img(32, 32, 4)
    lcu = LCU(
        ConditionUnit("fill {image}", [cur]),
        history=[ConditionUnit("make {image} red", [hist])],
        task="inpainting",
    )
    prepared = prepare_lcu(lcu, 256)
    assert torch.equal(prepared.images[1], torch.full((3, 32, 32), -1.0))  # current: all -1
    assert torch.equal(prepared.images[0], preprocess_image(hist, 256))  # history: as it was
    plain = prepare_lcu(LCU(ConditionUnit("fill {image}", [cur])), 256)
    assert torch.equal(plain.images[0], preprocess_image(cur, 256))  # no inpainting: whole


def test_an_inpainting_turn_keeps_its_unmasked_images_as_references(pipe):
    """ "Fill {image} with the object in {image1}": where some images of an inpainting turn
    have masks, one without is a reference, left whole (the released chat tags only the
    masked image as inpainting); it used to be blanked with no word said."""
    cur, ref, mask = img(32, 32, 4), img(32, 32, 5), box_mask(32, 32)
    lcu = LCU(ConditionUnit("fill {image} with {image1}", [cur, ref], [mask, None]), task="inpainting")  # fmt: skip
    prepared = prepare_lcu(lcu, 256)
    assert torch.equal(prepared.images[1], preprocess_image(ref, 256))  # the reference: whole
    m = (torch.from_numpy(np.array(mask)) > 128)[None].expand(3, -1, -1)
    filled = preprocess_image(cur, 256).masked_fill(m, -1.0)  # by hand: -1 under the mask
    assert torch.equal(prepared.images[0], filled) and 0 < m.float().mean() < 1
    out = pipe("fill {image} with {image1}", images=[cur, ref], masks=[mask, None], task="inpainting", num_inference_steps=1)  # fmt: skip
    assert out.images[0].size == (32, 32)


def test_history_images_are_filled_by_their_own_turns_task_as_released():
    """Released: task = history tasks + [request task], one per image. A history turn that
    was an inpainting request has its image blanked (wholly: no mask) whatever the current
    task; a plain history turn keeps a masked image as it was under an inpainting request."""
    hist, cur = img(32, 32, 3), img(32, 32, 4)
    was_inpainting = ConditionUnit("fill {image}", [hist], task="inpainting")
    prepared = prepare_lcu(LCU(ConditionUnit("now {image} blue", [cur]), [was_inpainting]), 256)
    assert torch.equal(prepared.images[0], torch.full((3, 32, 32), -1.0))
    assert torch.equal(prepared.images[1], preprocess_image(cur, 256))
    plain = ConditionUnit("make {image} red", [hist], [box_mask(32, 32)])
    lcu = LCU(ConditionUnit("fill {image}", [cur]), [plain], task="inpainting")
    prepared = prepare_lcu(lcu, 256)
    assert torch.equal(prepared.images[0], preprocess_image(hist, 256))  # its turn: not
    assert torch.equal(prepared.images[1], torch.full((3, 32, 32), -1.0))


def test_chat_keeps_each_turns_task_for_the_next(pipe):
    chat = pipe.chat(height=32, width=32, num_inference_steps=1)
    chat("a red square")
    chat("fill {image}", masks=[box_mask(32, 32)], task="inpainting")
    lcu = chat.lcu("now make {image} blue")
    assert [cu.task for cu in lcu.history] == ["inpainting"] and lcu.task == ""


def test_chat_leaves_text_to_image_turns_out_of_the_history(pipe):
    """A history turn's instruction is read only beside its images (frame_turns): a
    text-to-image turn has none, so it is left out of later LCUs, as the released chat
    leaves it out; max_history then counts the turns that are read."""
    chat = pipe.chat(height=32, width=32, num_inference_steps=1, max_history=1)
    chat("a red square")
    assert chat.lcu("make {image} blue").history == []
    chat("make {image} blue")
    lcu = chat.lcu("and a star")
    assert [cu.instruction for cu in lcu.history] == ["make {image} blue"]
    assert lcu.images == [chat.outputs[0], chat.outputs[1]]
    assert len(chat.history) == 2  # undo still forgets turn by turn
    chat.undo()
    assert chat.lcu("x").history == []


def test_chat_keeps_copies_of_what_it_was_given(pipe):
    """Drawing on an image (or zeroing a tensor) after passing it changes no later turn."""
    chat = pipe.chat(height=32, width=32, num_inference_steps=1)
    mine, tensor = img(32, 32, 3), torch.rand(3, 32, 32)
    chat("put {image1} on {image}", images=[mine, tensor])
    mine.paste((0, 255, 0), (0, 0, 32, 32))
    tensor.zero_()
    stored = chat.lcu("and a star").history[0].images
    assert stored[0].getpixel((0, 0)) != (0, 255, 0) and stored[1].sum() > 0


def test_chat_names_an_unknown_setting_of_a_turn(pipe):
    chat = pipe.chat(height=32, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['steps'\] for a turn; the pipeline takes"):  # fmt: skip
        chat("a red square", steps=2)
    assert chat.history == [] and chat.outputs == []


def test_negative_prompt_replaces_only_the_last_image_text_as_released(pipe):
    """Two images, no history: the released per-image prompt list is [p, p] and its negative
    copy [p, neg], so the unconditional texts are [neg (target), p, neg], not all neg."""
    a, b = img(32, 32, 5), img(32, 32, 6)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    got = pipe(
        "put {image1} into {image}", images=[a, b], negative_prompt="blurry", num_inference_steps=1,
        guidance_scale=3.0, guidance_rescale=0.0, latents=noise, output_type="latent",
        generator=torch.Generator().manual_seed(1),
    ).images  # fmt: skip
    enc = ConditionTokenizer(pipe.tokenizer, pipe.text_encoder, pipe.vae)
    lat = enc.encode_images([preprocess_image(a, 256), preprocess_image(b, 256)], generator=torch.Generator().manual_seed(1))  # fmt: skip
    t_p, t_neg = enc.encode_text(["put {image1} into {image}", "blurry"])
    ones, t = torch.ones(1, 4, 4), torch.tensor([999.0])
    frames, masks = [[noise[0], lat[0], lat[1]]], [[ones, ones, ones]]
    with torch.no_grad():
        c = pipe.transformer.predict(frames, masks, [[t_p, t_p, t_p]], t, pipe.indicators.table)[0]
        u = pipe.transformer.predict(
            frames, masks, [[t_neg, t_p, t_neg]], t, pipe.indicators.table
        )[0]
    eps = (u + 3.0 * (c - u)).double()
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[999]
    x0 = (noise[0].double() - (1 - abar).sqrt() * eps) / abar.sqrt()  # one step to t = 0
    torch.testing.assert_close(got[0].double(), x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(instruction="blend {image} and {image2}", images=[img(32, 32)]), r"\{image2\}"),
        (dict(instruction="edit {image}", images=[img(32, 32)], masks=[box_mask(48, 32)]), "size"),
        (dict(instruction="edit {image}", images=[img(32, 32)], masks=[None, None]), "mask"),
        (dict(instruction="many", images=[img(16, 16, i) for i in range(10)]), "9"),
        (dict(instruction="a star", height=30), "multiple of 16"),
        (  # before any encoder runs: 1024 squares of 16 px against the tiny model's 256
            dict(instruction="a star", height=512, width=512),
            r"512 x 512 is 1024 squares of 16 px, more than this model's 256 \(at most 256 x 256",
        ),
        (dict(instruction="a star", output_type="tensor"), "output_type"),
        (
            dict(instruction="a star", latents=torch.zeros(1, 4, 3, 3), height=32, width=32),
            "latents shape",
        ),
    ],
)
def test_bad_requests_raise_value_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs, num_inference_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(images=img(32, 32)), r"images: expected a list of RGB PIL images"),
        (dict(images=torch.rand(3, 32, 32)), r"images: expected a list .*tensor of shape"),
        (dict(images=[img(32, 32)], masks=box_mask(32, 32)), r"masks: expected a list"),
        (dict(history=["abc"]), r"history\[0\]: expected a ConditionUnit or a dict .*str 'abc'"),
        (dict(history=[None]), r"history\[0\]: expected a ConditionUnit or a dict"),
        (dict(history=[("x", [img(32, 32)])]), r"history\[0\]: expected a ConditionUnit"),
        (
            dict(history=[{"instruction": "a", "image": [img(32, 32)]}]),
            r"history\[0\]: unknown keys \['image'\]; expected .* instruction, images, masks",
        ),
        (dict(history=[{"images": [img(32, 32)]}]), r"history\[0\]: no 'instruction'"),
        (dict(history={"instruction": "a"}), r"history: expected a list of turns"),
        (
            dict(history=[ConditionUnit("a"), {"instruction": "b", "images": "a.png"}]),
            r"history\[1\]: images: expected a list",
        ),
        (dict(images=[img(64, 32)], height=32), "give both height and width, or neither"),
        (dict(width=32), "give both height and width, or neither"),
        (dict(height=64.0, width=64), r"height must be a positive int multiple of 16, got 64\.0"),
        (dict(height=64, width=True), "width must be a positive int"),
        (dict(height=32, width=32, num_inference_steps=2.5), "num_inference_steps must be an int"),
        (dict(height=32, width=32, guidance_scale=1.0, guidance_rescale=1.5), "rescale"),
        (dict(height=32, width=32, guidance_scale=0.5, guidance_rescale=-0.1), "rescale"),
        (dict(height=32, width=32, guidance_scale=-1.0), "guidance scale must be finite and >= 0"),
        (dict(height=32, width=32, guidance_scale=float("inf")), "guidance scale must be finite"),
        (dict(height=32, width=32, negative_prompt=None), "negative_prompt: expected a str"),
        (
            dict(
                images=[
                    torch.rand(3, 32, 32).index_put_(
                        (torch.tensor(0),) * 3, torch.tensor(float("nan"))
                    )
                ]
            ),
            "image tensor: values must be finite",
        ),
    ],
)
def test_bad_arguments_name_the_argument(pipe, kwargs, message):
    kwargs = {"num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe("edit {image}" if "images" in kwargs else "a star", **kwargs)


def test_numpy_integer_sizes_and_steps_are_accepted(pipe):
    n = np.int64
    out = pipe("a star", height=n(32), width=n(48), num_inference_steps=n(1)).images[0]
    assert out.size == (48, 32)


def test_chat_refuses_a_single_image_instead_of_a_list(pipe):
    chat = pipe.chat(height=32, width=32, num_inference_steps=1)
    chat("a red square")
    for bad in (chat.outputs[-1], torch.rand(3, 32, 32)):
        with pytest.raises(ValueError, match="images: expected a list"):
            chat("make {image} blue", images=bad)
    assert len(chat.history) == 1  # a refused turn leaves the session as it was


def test_chat_builds_the_same_lcu_and_images_as_explicit_history(pipe):
    kw = dict(height=32, width=32, num_inference_steps=STEPS)
    chat = pipe.chat(**kw)
    first = chat("a red square", generator=torch.Generator().manual_seed(0))
    second = chat("make {image} blue", generator=torch.Generator().manual_seed(1))
    lcu3 = chat.lcu("add a circle to {image}")
    third = chat("add a circle to {image}", generator=torch.Generator().manual_seed(2))
    # the explicit call: turn 2 edited the first output (turn 1, text-to-image, has no
    # image for its text to go with: the chat leaves it out, and it would change nothing)
    history = [ConditionUnit("make {image} blue", [first])]
    explicit = pipe.build_lcu("add a circle to {image}", [second], None, history)
    assert (
        lcu3.instructions()
        == explicit.instructions()
        == ["make {image} blue", "add a circle to {image1}"]
    )
    with_t2i = pipe.build_lcu("add a circle to {image}", [second], None, [ConditionUnit("a red square"), *history])  # fmt: skip
    assert lcu3.frame_texts() == explicit.frame_texts() == with_t2i.frame_texts()
    assert all(same(a, b) for a, b in zip(lcu3.images, explicit.images))
    again = pipe(
        "add a circle to {image}",
        images=[second],
        history=history,
        generator=torch.Generator().manual_seed(2),
        **kw,
    )
    assert same(third, again.images[0])


def test_chat_keeps_going_past_nine_images_with_the_turns_that_fit(pipe):
    """An LCU holds 9 images over all turns: turn 11 (one text-to-image turn, then edits of
    each previous output) used to fail for good; it now reads the 8 latest history turns."""
    chat = pipe.chat(height=32, width=32, num_inference_steps=1)
    chat("a red square")
    for i in range(10):
        chat(f"edit {i} of {{image}}")
    assert len(chat.history) == len(chat.outputs) == 11
    lcu = chat.lcu("one more edit of {image}")
    assert len(lcu.images) == 9 and len(lcu.history) == 8
    assert [cu.instruction for cu in lcu.history] == [cu.instruction for cu in chat.history[-8:]]
    assert same(lcu.images[-1], chat.outputs[-1])
    assert len(pipe.chat(max_history=2).lcu("x").history) == 0  # no turns yet
    roomy = pipe.chat(max_history=20)  # more than the turns so far: all of them that fit
    roomy.history = chat.history[:3]  # the text-to-image turn, then two edits
    assert [cu.instruction for cu in roomy.lcu("x").history] == [
        cu.instruction for cu in chat.history[1:3]
    ]
    short = pipe.chat(height=32, width=32, num_inference_steps=1, max_history=1)
    short("a red square")
    short("make {image} blue")
    assert [cu.instruction for cu in short.lcu("x {image}").history] == ["make {image} blue"]
    short.undo()
    assert [cu.instruction for cu in short.history] == ["a red square"] and len(short.outputs) == 1
    short.reset()
    assert short.history == [] and short.outputs == []
    with pytest.raises(ValueError, match="nothing to undo"):
        short.undo()


def test_chat_output_is_not_the_stored_next_input(pipe):
    chat = pipe.chat(height=32, width=32, num_inference_steps=1)
    out = chat("a red square")
    kept = out.copy()
    out.paste((255, 0, 0), (0, 0, 32, 32))  # the user draws on what they were given
    assert same(chat.outputs[-1], kept) and same(chat.lcu("x").images[0], kept)


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        (dict(steps=4), r"unknown setting\(s\) \['steps'\] for the session"),
        (dict(height=60, width=64), "height must be a positive int multiple of 16, got 60"),
        (dict(guidance_scale=-1), "guidance scale must be finite and >= 0"),
        (dict(height=512, width=512), "more than this model's 256"),
    ],
)
def test_chat_checks_its_settings_when_made(pipe, defaults, message):
    """Each failed only at the first turn (``steps``: a TypeError)."""
    with pytest.raises(ValueError, match=message):
        pipe.chat(**defaults)


def test_chat_refuses_per_turn_defaults_and_passes_its_task(pipe):
    for bad in ({"history": []}, {"images": []}, {"masks": None}):
        with pytest.raises(ValueError, match="belong to a turn"):
            pipe.chat(**bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_history"):
            pipe.chat(max_history=bad)
    chat = pipe.chat(task="inpainting")
    assert chat.lcu("x").task == "inpainting" and chat.lcu("x", task="").task == ""
    with pytest.raises(ValueError, match="keeps its own history"):
        chat("x", history=[])


@pytest.mark.parametrize(("steps", "scale"), [(4, 3.0), (7, 3.0), (4, 1.0)])
def test_pipeline_equals_an_obvious_denoising_loop(pipe, steps, scale, monkeypatch):
    """Every step by hand: T5 per frame text, the negative replaces the current instruction,
    the released DDIM update from the DDPM equations, guidance with rescale. Each step ends
    at the next timestep of the trailing schedule, the last at alpha 1, at step counts that
    divide 1000 and at those that do not (where diffusers' DDIM step would not). A scale of
    1 samples the conditional prediction alone, one transformer call per step either way
    (the guided pair is one batch)."""
    history = [ConditionUnit("make {image} red", [img(32, 32, 7)])]
    image, mask = img(32, 32, 8), box_mask(32, 32)
    phi = 0.7
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    calls, forward = [], type(pipe.transformer).forward

    def counted(self, tokens, text, timesteps, packed, *args, **kwargs):
        calls.append(packed.num_samples)
        return forward(self, tokens, text, timesteps, packed, *args, **kwargs)

    monkeypatch.setattr(type(pipe.transformer), "forward", counted)
    got = pipe(
        "now add {image} a hat", images=[image], masks=[mask], history=history, negative_prompt="blurry",
        num_inference_steps=steps, guidance_scale=scale, guidance_rescale=phi, latents=noise,
        output_type="latent", generator=torch.Generator().manual_seed(3), task="inpainting",
    ).images  # fmt: skip
    assert calls == [2 if scale > 1 else 1] * steps  # samples per call: the CFG pair, or one
    monkeypatch.undo()

    enc = ConditionTokenizer(pipe.tokenizer, pipe.text_encoder, pipe.vae)
    hist_img = preprocess_image(history[0].images[0], 256)
    cur_img = preprocess_image(image, 256)
    m = (torch.from_numpy(np.array(mask)) > 128).float()[None]  # already 32x32
    cur_img = torch.where(m.bool(), torch.full_like(cur_img, -1.0), cur_img)  # the repainting fill
    g = torch.Generator().manual_seed(3)
    lat = enc.encode_images([hist_img, cur_img], generator=g)
    t_hist, t_cur, t_neg = enc.encode_text(["make {image} red", "now add {image1} a hat", "blurry"])
    ind = pipe.indicators.table
    ones = torch.ones(1, 4, 4)
    mask_lat = downsample_mask(m)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    ts = (torch.arange(1000, 0, -1000 / steps).round() - 1).long()
    x = noise.double()
    for i, t in enumerate(ts):
        frames = [[x[0].float(), lat[0], lat[1]]]
        masks = [[ones, ones, mask_lat]]  # the target takes the first image's (no) mask
        tt = torch.tensor([float(t)])
        with torch.no_grad():
            c = pipe.transformer.predict(frames, masks, [[t_cur, t_hist, t_cur]], tt, ind)[
                0
            ].double()
            u = pipe.transformer.predict(frames, masks, [[t_neg, t_hist, t_neg]], tt, ind)[
                0
            ].double()
        eps = c  # no guidance
        if scale > 1:
            eps = u + scale * (c - u)
            eps = eps * (phi * c.std() / eps.std() + (1 - phi))
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


def test_output_types_are_the_decoded_latent_by_hand(pipe):
    """The same sample three ways: "np" is clamp((VAE(z) + 1) / 2 + 0.5/255, 0, 1) of the
    "latent" output z, and "pil" that times 255, truncated to uint8 (the released rule)."""
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    kw = dict(height=32, width=32, num_inference_steps=2, latents=noise)
    z = pipe("a red circle", output_type="latent", **kw).images
    arr = pipe("a red circle", output_type="np", **kw).images
    pil = pipe("a red circle", output_type="pil", **kw).images
    with torch.no_grad():
        pixels = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample[0]  # (3, H, W)
    by_hand = ((pixels.permute(1, 2, 0) + 1) / 2 + 0.5 / 255).clamp(0, 1).numpy()
    np.testing.assert_allclose(arr[0], by_hand, rtol=0, atol=1e-6)
    assert np.array_equal(np.asarray(pil[0]), (arr[0] * 255).astype(np.uint8))


def test_a_bf16_transformer_samples_what_the_fp32_one_does(pipe):
    """Weights in bf16 (the released inference dtype): the same sampled latent as fp32 to
    bf16's precision, not merely an image of the right size."""
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    kw = dict(height=32, width=32, num_inference_steps=4, latents=noise, output_type="latent")
    fp32 = pipe("make it blue", **kw).images
    half = copy.deepcopy(pipe)
    half.transformer.to(torch.bfloat16)
    bf16 = half("make it blue", **kw).images
    assert bf16.dtype == torch.float32  # the sampler's latents stay float32
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 2e-2, rel


def test_a_swapped_scheduler_scales_the_noise_of_its_own_schedule(monkeypatch):
    """Euler's initial-noise factor follows the schedule set (leading spacing: sqrt(max
    sigma^2 + 1), which its scale_model_input divides out again): the first model input is
    the given noise. Read before set_timesteps, it was the 1000-step schedule's factor."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")  # fmt: skip
    seen = []
    scale = EulerDiscreteScheduler.scale_model_input

    def spy(self, sample, timestep):
        seen.append(out := scale(self, sample, timestep))
        return out

    monkeypatch.setattr(EulerDiscreteScheduler, "scale_model_input", spy)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    pipe("a red square", height=32, width=32, num_inference_steps=20, latents=noise, output_type="latent")  # fmt: skip
    torch.testing.assert_close(seen[0], noise)


def test_schedulers_without_a_generator_or_with_dynamic_shifting():
    """PNDM's step takes no generator (it is passed only where step takes one); a flow
    scheduler with dynamic shifting needs a mu ACE does not define: refused in step 1."""
    from diffusers import PNDMScheduler

    from ace.ddim import for_sampling
    from ace.pipeline import _Sampling

    pipe = tiny_pipeline()
    g = torch.Generator()
    ddim = _Sampling([], [], [], None, None, for_sampling(pipe.scheduler), g)
    assert ddim.step_kwargs == {"generator": g}  # its step passes **kwargs on to DDIM's
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    out = pipe("a red square", height=32, width=32, num_inference_steps=3, output_type="latent")
    assert out.images.shape == (1, 4, 4, 4) and torch.isfinite(out.images).all()
    flow = tiny_pipeline(objective="rectified-flow")
    flow.scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow.scheduler.config, use_dynamic_shifting=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True, which needs a shift \(mu\)"):
        flow("a red square", height=32, width=32, num_inference_steps=3)


def test_flow_pipeline_equals_an_obvious_euler_loop():
    """A rectified-flow pipeline: sigmas 1 .. 1/n, shifted once, x += (s' - s) * v, guided."""
    pipe = tiny_pipeline(seed=1, objective="rectified-flow")
    steps, scale, shift = 4, 2.0, 3.0
    pipe.scheduler = RectifiedFlow(shift=shift).make_scheduler()
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    got = pipe(
        "a red square", height=32, width=32, num_inference_steps=steps, guidance_scale=scale,
        guidance_rescale=0.0, latents=noise, output_type="latent",
    ).images  # fmt: skip

    enc = ConditionTokenizer(pipe.tokenizer, pipe.text_encoder, pipe.vae)
    t_cur, t_neg = enc.encode_text(["a red square", ""])
    ind, ones = pipe.indicators.table, torch.ones(1, 4, 4)
    sigmas = [shift * s / (1 + (shift - 1) * s) for s in np.linspace(1.0, 1.0 / steps, steps)]
    x = noise.double()
    for i, s in enumerate(sigmas):
        tt = torch.tensor([s * 1000.0], dtype=torch.float32)
        with torch.no_grad():
            c = pipe.transformer.predict([[x[0].float()]], [[ones]], [[t_cur]], tt, ind)[0]
            u = pipe.transformer.predict([[x[0].float()]], [[ones]], [[t_neg]], tt, ind)[0]
        v = u.double() + scale * (c.double() - u.double())
        x = x + ((sigmas[i + 1] if i + 1 < steps else 0.0) - s) * v
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["ddpm-eps", "rectified-flow"])
def test_no_host_sync_inside_a_denoise_step(objective):
    """The ops that make the host wait for a GPU (reading a value, data-dependent shapes)
    happen once per call, while preparing, never once per step: 2 and 5 steps count the
    same. Before, the scheduler's timesteps lived on the device and each DDIM step indexed
    its CPU tables with them."""
    from ace.testing import host_syncs

    pipe = tiny_pipeline(objective=objective)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    counts = []
    for steps in (2, 5):
        with host_syncs() as syncs:
            pipe("make {image} blue", images=[image], num_inference_steps=steps)
        counts.append(sum(syncs.values()))
    assert 0 < counts[0] == counts[1], counts  # the spy sees the preparation's reads


def test_cuda_graph_needs_a_cuda_device(pipe):
    """enable_cuda_graph() on a CPU pipeline: a ValueError that says why, and plain calls
    again after disable_cuda_graph()."""
    from ace.models.cuda_graph import GraphedForward

    pipe.enable_cuda_graph()
    try:
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            run(pipe, "a red circle", height=64, width=64)
    finally:
        pipe.disable_cuda_graph()
    assert run(pipe, "a red circle", height=64, width=64).size == (64, 64)
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="CUDA graphs need the inputs on a CUDA device"):
        GraphedForward(pipe.transformer, x, x, x[:, 0], None)


def test_graph_cache_records_once_per_key_and_drops_the_least_recently_used():
    """GraphCache (what enable_cuda_graph() keeps): a key is recorded once; when full, the
    layout not used for longest goes, not the first recorded."""
    from ace.models.cuda_graph import GraphCache

    cache, recorded = GraphCache(max_size=2), []

    def get(key):
        return cache.get(key, lambda: recorded.append(key) or f"graph {key}")

    assert get("a") == "graph a" and get("b") == "graph b"
    assert get("a") == "graph a"  # replayed, and now the most recently used
    get("c")  # full: drops b, which was used longest ago
    assert recorded == ["a", "b", "c"]
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    get("b")
    assert recorded == ["a", "b", "c", "b"] and "a" not in cache
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        GraphCache(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_sampling_equals_plain_calls_and_reuses_its_graph():
    """The same images with and without graphs (both CFG halves, an input image); a second
    request of the same layout replays the recorded graph, a new size records another;
    model CPU offload is refused."""
    pipe = tiny_pipeline(seed=0).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    image = img(64, 48)

    def both():
        return [
            pipe(instruction, images=images, num_inference_steps=4, output_type="latent",
                 generator=torch.Generator().manual_seed(1), **kw).images
            for instruction, images, kw in (
                ("make {image} blue", [image], {}),
                ("make {image} pink", [image], {}),  # same layout (4 bytes), other text
                ("a red circle", None, {"height": 32, "width": 32}),
            )
        ]  # fmt: skip

    plain = both()
    pipe.enable_cuda_graph()
    graphed = both()
    assert len(pipe._cuda_graphs) == 2  # the two edits share one layout
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    pipe.enable_model_cpu_offload()
    with pytest.raises(ValueError, match="does not work with enable_model_cpu_offload"):
        pipe("make {image} blue", images=[image], num_inference_steps=2)
