"""scripts/infer.py and scripts/convert_official.py, run as a user would, on tiny components."""

import importlib.util
import json
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_conditioning import to_ldm

from ace.diffusion import DDPMEpsilon
from ace.pipeline import ACEPipeline
from ace.reference import ReferenceDiT
from ace.testing import TEXT_DIM, tiny_pipeline, tiny_text_encoder, tiny_vae

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name, argv, capsys):
    """Run scripts/NAME.py as __main__; return (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = [str(SCRIPTS / name), *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


def save_image(path, w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).convert(mode).save(path)
    return path


# ---------------------------------------------------------------------------------- infer.py


def test_infer_text_to_image_edit_and_history(pipe_dir, tmp_path, capsys):
    out = tmp_path / "t2i.png"
    code, stdout, _ = script("infer.py", ["--pipeline", pipe_dir, "--instruction", "a red circle", "--steps", 2, "--height", 32, "--width", 48, "--output", out], capsys)  # fmt: skip
    assert code == 0 and f"wrote {out} (48 x 32)" in stdout and Image.open(out).size == (48, 32)

    a, b = save_image(tmp_path / "a.png", 48, 32, 1), save_image(tmp_path / "b.png", 32, 32, 2)
    m = save_image(tmp_path / "m.png", 48, 32, 3, mode="L")
    edit = tmp_path / "edit.png"
    code, _, _ = script("infer.py", ["--pipeline", pipe_dir, "--instruction", "put {image1} into {image}", "--image", a, "--image", b, "--mask", m, "--mask", "none", "--steps", 2, "--output", edit], capsys)  # fmt: skip
    assert code == 0 and Image.open(edit).size == (48, 32)

    (tmp_path / "turns.json").write_text(
        json.dumps([{"instruction": "make {image} red", "images": ["b.png"]}])
    )
    turn = tmp_path / "turn.png"
    args = ["--pipeline", pipe_dir, "--history", tmp_path / "turns.json", "--instruction", "now {image} blue", "--image", edit, "--steps", 2, "--seed", 4, "--output", turn]  # fmt: skip
    assert script("infer.py", args, capsys)[0] == 0
    # the same request from Python gives the same pixels
    pipe = ACEPipeline.from_pretrained(pipe_dir)
    expected = pipe(
        "now {image} blue", images=[Image.open(edit).convert("RGB")], num_inference_steps=2,
        history=[{"instruction": "make {image} red", "images": [Image.open(tmp_path / "b.png").convert("RGB")]}],
        generator=torch.Generator("cpu").manual_seed(4),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(turn)), np.asarray(expected))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "missing.png"], "image not found: missing.png"),
        (["--image", "{a}", "--mask", "none", "--mask", "none"], "2 --mask"),
        (["--instruction", "blend {image} and {image2}", "--image", "{a}"], r"\{image2\}"),
        (["--history", "nothing.json"], "history file not found"),
        (["--image", "{small}"], r"images\[0\]: image of size \(8, 8\) is too small"),
        (["--output", "out.gif"], "--output must end with"),
    ],
)
def test_infer_user_mistakes_exit_2_without_traceback(pipe_dir, tmp_path, capsys, extra, message):
    a = save_image(tmp_path / "a.png", 32, 32)
    small = save_image(tmp_path / "small.png", 8, 8)
    argv = [
        "--pipeline",
        pipe_dir,
        "--instruction",
        "edit {image}",
        "--steps",
        1,
        "--output",
        tmp_path / "o.png",
    ]
    argv += [{"{a}": str(a), "{small}": str(small)}.get(x, x) for x in extra]
    code, _, err = script("infer.py", argv, capsys)
    assert code == 2 and "infer.py: error:" in err and "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "small.png"]  # nothing more


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"instruction": "x {image}", "images": "a.png"}], r"history turn 0: 'images' must be a list of file paths, got \"a.png\""),
        ([{"instruction": "x", "images": None}], r"history turn 0: 'images' must be a list of file paths, got null"),
        ([{"instruction": "x {image}", "images": ["a.png"], "masks": [5]}], r"history turn 0: 'masks' must be a list of file paths or null, got \[5\]"),
        ([{"instruction": "a"}, {"instruction": "x {image}", "images": ["a.png"], "masks": ["m.png"]}], r"history turn 1: masks\[0\]: size \(H, W\) = \(16, 16\) differs"),
        ([{"instruction": "x {image}", "images": ["a.png"], "masks": [None, None]}], "history turn 0: need one mask"),
        ([{"instruction": 3}], "history turn 0: instruction: expected a str"),
        ([{"instruction": "fill {image}", "images": ["a.png"], "task": "inpainting"}], r"history\[0\]: task='inpainting' fills .* no masks"),
    ],
)  # fmt: skip
def test_infer_bad_history_names_the_turn_and_key(pipe_dir, tmp_path, capsys, turns, message):
    save_image(tmp_path / "a.png", 32, 32)
    save_image(tmp_path / "m.png", 16, 16, mode="L")
    (tmp_path / "turns.json").write_text(json.dumps(turns))
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["--pipeline", pipe_dir, "--instruction", "a star", "--history", tmp_path / "turns.json", "--steps", 1, "--output", tmp_path / "o.png"]  # fmt: skip
    code, _, err = script("infer.py", argv, capsys)
    assert code == 2 and err.startswith("infer.py: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_infer_checks_output_and_size_before_loading_the_pipeline(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(ACEPipeline, "from_pretrained", never)
    (tmp_path / "model_index.json").write_text("{}")  # looks like a pipeline directory
    (tmp_path / "x.png").mkdir()
    base = ["--pipeline", tmp_path, "--instruction", "a star", "--steps", 1]
    code, _, err = script("infer.py", [*base, "--output", tmp_path / "x.png"], capsys)
    assert code == 2 and "is a directory" in err and err.count("\n") == 1, err
    code, _, err = script("infer.py", [*base, "--height", 32, "--output", tmp_path / "o.png"], capsys)  # fmt: skip
    assert code == 2 and "give both --height and --width, or neither" in err, err
    # the request and its settings too: a typo costs no pipeline load (minutes with T5-XXL)
    a = save_image(tmp_path / "a.png", 32, 32)
    m = save_image(tmp_path / "m.png", 16, 16, mode="L")
    (tmp_path / "file").write_text("")
    out = ["--output", tmp_path / "o.png"]
    red = tmp_path / "red.png"  # a red brush stroke: grey 76, at or below the threshold
    Image.new("RGB", (32, 32), (220, 40, 40)).save(red)
    alpha = tmp_path / "alpha.png"  # the transparent part meant as the region
    Image.new("RGBA", (32, 32), (255, 255, 255, 0)).save(alpha)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG named as the history
    big = save_image(tmp_path / "big.png", 64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's size guard: > 2x is an error
    for extra, message in [
        (["--height", 50, "--width", 64, *out], "height must be a positive int multiple of 16"),
        (["--steps", 0, *out], "num_inference_steps must be an int >= 1, got 0"),
        (["--guidance", "inf", *out], "guidance scale must be finite"),
        (["--rescale", 2, *out], "guidance rescale must lie in"),
        (["--seed", 2**70, *out], r"--seed must lie in \[0, 2\*\*64\)"),
        (["--instruction", "{image2}", "--image", a, "--image", a, *out], r"\{image2\}"),
        (["--instruction", "edit {image}", "--image", a, "--mask", m, *out], "differs"),
        (["--output", tmp_path / "file" / "o.png"], "is a file, not a directory"),
        # masks that would silently become "the whole image", and typos of the task
        (["--instruction", "edit {image}", "--image", a, "--mask", red, *out], "is in colour"),
        (["--instruction", "edit {image}", "--image", a, "--mask", alpha, *out], "transparency"),
        (["--task", "inpaint", *out], "invalid choice: 'inpaint'"),
        (
            ["--instruction", "fill {image}", "--image", a, "--task", "inpainting", *out],
            "task='inpainting' fills the masked pixels .* but it has no masks",
        ),
        (["--history", binary, *out], "is not valid JSON"),
        (["--instruction", "edit {image}", "--image", big, *out], "cannot read image .*big.png"),
    ]:
        code, _, err = script("infer.py", [*base, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and re.search(message, err), (extra, err)
    names = ["a.png", "alpha.png", "big.png", "bin.json", "file", "m.png", "model_index.json", "red.png", "x.png"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # nothing written


def test_infer_checks_a_size_past_the_models_budget_before_loading(pipe_dir, tmp_path, capsys, monkeypatch):  # fmt: skip
    def never(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(ACEPipeline, "from_pretrained", never)
    argv = ["--pipeline", pipe_dir, "--instruction", "a star", "--height", 512, "--width", 512, "--output", tmp_path / "o.png"]  # fmt: skip
    code, _, err = script("infer.py", argv, capsys)
    assert code == 2 and "more than this model's 256 (at most 256 x 256" in err, err


def test_infer_task_choices_are_the_released_inpainting_tags():
    from ace.request import INPAINTING_TASKS

    spec = importlib.util.spec_from_file_location("infer", SCRIPTS / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    assert infer.TASKS == INPAINTING_TASKS


def test_infer_dtype_auto_is_bf16_only_where_the_gpu_runs_it(monkeypatch):
    """--dtype auto: bf16 on an Ampere or newer GPU; fp32 on a T4 or V100 (which would
    emulate bf16) and on the CPU."""
    spec = importlib.util.spec_from_file_location("infer", SCRIPTS / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    assert infer.auto_dtype(torch.device("cpu")) == "fp32"
    for capability, want in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert infer.auto_dtype(torch.device("cuda:1")) == want


def test_infer_dtype_loads_the_weights_in_it(pipe_dir, tmp_path, capsys):
    """--dtype bf16 is the pipeline loaded with dtype=bfloat16 (the same image, bit for
    bit); --offload without an accelerator is refused."""
    base = ["--pipeline", pipe_dir, "--instruction", "a star", "--height", 32, "--width", 32, "--steps", 1]  # fmt: skip
    code, _, err = script("infer.py", [*base, "--dtype", "bf16", "--output", tmp_path / "b.png"], capsys)  # fmt: skip
    assert code == 0, err
    pipe = ACEPipeline.from_pretrained(pipe_dir, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    expected = pipe("a star", height=32, width=32, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(0)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(expected))
    code, _, err = script("infer.py", [*base, "--offload", "--device", "cpu", "--output", tmp_path / "o.png"], capsys)  # fmt: skip
    assert code == 2 and "--offload" in err and not (tmp_path / "o.png").exists()


def test_infer_task_inpainting_is_the_pipelines(pipe_dir, tmp_path, capsys):
    """--task reaches the pipeline: the CLI's inpainting is the API's, not a plain edit."""
    a = save_image(tmp_path / "a.png", 32, 32)
    m = save_image(tmp_path / "m.png", 32, 32, mode="L")
    base = ["--pipeline", pipe_dir, "--instruction", "a square in {image}", "--image", a, "--mask", m, "--steps", 1, "--guidance", 1]  # fmt: skip
    outs = {}
    for task in ("inpainting", ""):
        outs[task] = tmp_path / f"o{task}.png"
        code, _, err = script("infer.py", [*base, "--task", task, "--output", outs[task]], capsys)
        assert code == 0, err
    pipe = ACEPipeline.from_pretrained(pipe_dir)
    expected = pipe(
        "a square in {image}", images=[Image.open(a).convert("RGB")], masks=[Image.open(m)],
        num_inference_steps=1, guidance_scale=1.0, task="inpainting",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]  # fmt: skip
    got = {task: np.asarray(Image.open(path)) for task, path in outs.items()}
    assert np.array_equal(got["inpainting"], np.asarray(expected))
    assert not np.array_equal(got["inpainting"], got[""])


def test_infer_rejects_a_directory_that_is_not_a_pipeline(pipe_dir, tmp_path, capsys):
    code, _, err = script("infer.py", ["--pipeline", tmp_path, "--instruction", "x", "--output", tmp_path / "o.png"], capsys)  # fmt: skip
    assert code == 2 and "not an ACEPipeline directory" in err
    shutil.copytree(pipe_dir, tmp_path / "broken")
    for weights in (tmp_path / "broken" / "transformer").glob("*.safetensors"):
        weights.unlink()
    argv = ["--pipeline", tmp_path / "broken", "--instruction", "x", "--output", tmp_path / "o.png"]
    code, _, err = script("infer.py", argv, capsys)
    last = err.splitlines()[-1]  # after the loading bars
    assert code == 2 and last.startswith(f"infer.py: error: --pipeline {tmp_path / 'broken'}: ")
    assert "Traceback" not in err, err


# ------------------------------------------------------------------------ infer.py --requests


def request_files(tmp_path):
    """Inputs and a requests file of four lines (and a blank one): text-to-image, an edit
    with a mask, seed and output of its own, a multi-turn inpainting request."""
    a = save_image(tmp_path / "a.png", 48, 32, 1)
    save_image(tmp_path / "m.png", 48, 32, 3, mode="L")
    lines = [
        {"instruction": "a red circle", "height": 32, "width": 32},
        {"instruction": "make {image} blue", "images": ["a.png"], "masks": ["m.png"], "seed": 7, "output": "sub/edit.jpg"},
        {"instruction": "a green square", "negative_prompt": "blurry"},
        {"instruction": "now {image} green", "images": ["a.png"], "masks": ["m.png"], "task": "inpainting",
         "history": [{"instruction": "make {image} red", "images": ["a.png"]}]},
    ]  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines[:2]) + "\n\n"
    (tmp_path / "req.jsonl").write_text(text + "\n".join(json.dumps(x) for x in lines[2:]))
    return a, tmp_path / "req.jsonl"


def test_infer_requests_make_what_single_calls_make(pipe_dir, tmp_path, capsys):
    """--requests: each line's image is the one infer.py makes for it alone, with the
    line's seed or --seed plus its index: bitwise at --batch-size 1, up to a level of
    rounding when the lines share a call; --skip-existing writes only what is missing."""
    a, requests = request_files(tmp_path)
    m = tmp_path / "m.png"
    common = ["--pipeline", pipe_dir, "--steps", 2]
    singles = {
        "00000.png": ["--instruction", "a red circle", "--height", 32, "--width", 32, "--seed", 3],
        "sub/edit.jpg": ["--instruction", "make {image} blue", "--image", a, "--mask", m, "--seed", 7],
        "00002.png": ["--instruction", "a green square", "--negative", "blurry", "--seed", 5],
    }  # fmt: skip
    (tmp_path / "turns.json").write_text(
        json.dumps([{"instruction": "make {image} red", "images": ["a.png"]}])
    )
    singles["00003.png"] = ["--instruction", "now {image} green", "--image", a, "--mask", m, "--task", "inpainting", "--history", tmp_path / "turns.json", "--seed", 6]  # fmt: skip
    expected = {}
    for name, argv in singles.items():
        out = tmp_path / "single" / name
        assert script("infer.py", [*common, *argv, "--output", out], capsys)[0] == 0
        expected[name] = np.asarray(Image.open(out), dtype=np.int16)
    for batch in (1, 3):
        out = tmp_path / f"batch{batch}"
        argv = [*common, "--requests", requests, "--output", out, "--seed", 3, "--batch-size", batch]  # fmt: skip
        code, stdout, err = script("infer.py", argv, capsys)
        assert code == 0 and f"wrote 4 images under {out}" in stdout, err
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == sorted(singles)
        for name, want in expected.items():
            got = np.asarray(Image.open(out / name), dtype=np.int16)
            if batch == 1 or name.endswith(".jpg"):  # JPEG: the same pixels, re-encoded
                assert np.array_equal(got, want) if batch == 1 else np.abs(got - want).max() <= 8
            else:
                assert np.abs(got - want).max() <= 1, (batch, name)
    (out / "00002.png").unlink()
    before = (out / "00000.png").stat().st_mtime_ns
    argv = [*common, "--requests", requests, "--output", out, "--seed", 3, "--skip-existing"]
    code, stdout, _ = script("infer.py", argv, capsys)
    assert code == 0 and "wrote 1 images" in stdout and "left out 3 already there" in stdout
    assert (out / "00002.png").is_file() and (out / "00000.png").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"req.jsonl line 2: not valid JSON"),
        ('["a star"]', r"line 2: expected a request \(a JSON object\), got \["),
        ('{"prompt": "a star"}', r"line 2: needs 'instruction' \(and optional 'height', 'history'"),
        ('{"instruction": "a star", "seed": -1}', r"line 2: seed must be an int in \[0, 2\*\*64\), got -1"),
        ('{"instruction": "a star", "output": "x.gif"}', r"line 2: output must be a file name ending with"),
        ('{"instruction": "a star", "output": "../x.png"}', r"line 2: output ../x.png must lie under --output"),
        ('{"instruction": "a star", "output": "00000.png"}', r"line 2: output 00000.png is also .*line 1's"),
        ('{"instruction": "x {image}", "images": ["nope.png"]}', r"line 2: image not found: .*nope.png"),
        ('{"instruction": "x {image1}", "images": ["a.png"]}', r"line 2: .*\{image1\}"),
        ('{"instruction": "a star", "height": 32}', r"line 2: .*height and width"),
        ('{"instruction": "a star", "negative_prompt": 3}', r"line 2: negative_prompt must be a str"),
        ('{"instruction": "x {image}", "images": ["a.png"], "task": "inpainting"}', r"line 2: task='inpainting' fills .* but it has no masks"),
        ('{"instruction": "a", "history": [{"instruction": 3}]}', r"line 2: history turn 0: instruction: expected a str"),
        ('{"instruction": "a", "history": {"instruction": "b"}}', r"line 2: history must hold a list of turns"),
    ],
)  # fmt: skip
def test_infer_bad_requests_name_their_line_and_write_nothing(pipe_dir, tmp_path, capsys, line, message):  # fmt: skip
    save_image(tmp_path / "a.png", 32, 32)
    (tmp_path / "req.jsonl").write_text('{"instruction": "a circle"}\n' + line + "\n")
    out = tmp_path / "out"
    argv = ["--pipeline", pipe_dir, "--requests", tmp_path / "req.jsonl", "--output", out, "--steps", 1]  # fmt: skip
    code, _, err = script("infer.py", argv, capsys)
    assert code == 2 and err.startswith("infer.py: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--instruction", "a star"], "give --instruction .* or --requests FILE .*, not both"),
        (["--image", "a.png"], r"with --requests, give --image per request"),
        (["--height", 32, "--width", 32], r"with --requests, give --height, --width per request"),
        (["--batch-size", 0], r"--batch-size must be >= 1, got 0"),
    ],
)
def test_infer_requests_flag_mistakes(pipe_dir, tmp_path, capsys, extra, message):
    (tmp_path / "req.jsonl").write_text('{"instruction": "a circle"}\n')
    argv = ["--pipeline", pipe_dir, "--requests", tmp_path / "req.jsonl", "--output", tmp_path / "out", *extra]  # fmt: skip
    code, _, err = script("infer.py", argv, capsys)
    assert code == 2 and re.search(message, err), err
    code, _, err = script("infer.py", ["--pipeline", pipe_dir, "--instruction", "a", "--batch-size", 2, "--output", tmp_path / "o.png"], capsys)  # fmt: skip
    assert code == 2 and "--batch-size and --skip-existing go with --requests" in err
    (tmp_path / "file").write_text("")
    argv = ["--pipeline", pipe_dir, "--requests", tmp_path / "req.jsonl", "--output", tmp_path / "file"]  # fmt: skip
    code, _, err = script("infer.py", argv, capsys)
    assert code == 2 and "with --requests give a directory" in err


# ------------------------------------------------------------------------ convert_official.py


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Tiny stand-ins for the released files: a DiT .pth, an LDM vae.bin, T5 and tokenizer dirs."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    dit_cfg = dict(
        in_channels=4, patch_size=2, hidden_size=48, depth=2, num_heads=4, mlp_ratio=4.0,
        text_dim=TEXT_DIM, rope_max_len=256, qk_norm=True, pred_sigma=True, num_indicators=10,
    )  # fmt: skip
    ref = ReferenceDiT(**dit_cfg)
    torch.save({"state_dict": ref.state_dict()}, root / "dit.pth")
    vae = tiny_vae()
    torch.save(to_ldm(vae.state_dict(), 4), root / "vae.bin")
    tokenizer, t5 = tiny_text_encoder()
    t5.save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "dit.json").write_text(json.dumps(dit_cfg))
    (root / "vae.json").write_text(
        json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")})
    )
    return root, ref, vae, tokenizer, t5, dit_cfg


def convert_args(root, out, resolution=512):
    return ["--dit", root / "dit.pth", "--vae", root / "vae.bin", "--t5", root / "t5", "--tokenizer", root / "tokenizer", "--resolution", resolution, "--out", out, "--dtype", "fp32", "--dit-config", root / "dit.json", "--vae-config", root / "vae.json"]  # fmt: skip


def test_convert_official_writes_a_pipeline_that_reproduces_the_components(
    released, tmp_path, capsys
):
    root, ref, vae = released[:3]
    out = tmp_path / "ace-1024"
    code, _, err = script("convert_official.py", convert_args(root, out, 1024), capsys)
    assert code == 0, err
    files = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert ".safetensors" in files and ".bin" not in files and ".pth" not in files
    loaded = ACEPipeline.from_pretrained(out)
    assert loaded.config.default_steps == 50  # released: 50 steps at 1024 px
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    # the transformer predicts what the released-layout reference predicts
    frames, texts = (
        [[torch.randn(4, 4, 4), torch.randn(4, 4, 6)]],
        [[torch.randn(3, TEXT_DIM), torch.randn(2, TEXT_DIM)]],
    )
    ind = loaded.indicators.table
    with torch.no_grad():
        got = loaded.transformer.predict(frames, None, texts, torch.tensor([500.0]), ind)[0]
        want = ref(frames, [[None, None]], texts, torch.tensor([500.0]), ind)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the VAE decodes like the one the LDM file came from
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(z).sample, vae.decode(z).sample)


def test_convert_official_mistakes_leave_nothing_on_disk(released, tmp_path, capsys):
    root = released[0]
    out = tmp_path / "pipe"
    args = convert_args(root, out)
    args[args.index(root / "dit.pth")] = root / "vae.bin"  # a VAE where the DiT should be
    code, _, err = script("convert_official.py", args, capsys)
    assert code == 2 and "unknown keys in the ACE checkpoint" in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory
    out.mkdir()
    code, _, err = script("convert_official.py", convert_args(root, out), capsys)
    assert code == 2 and "already exists" in err
    args = convert_args(root, tmp_path / "other")
    args[args.index(root / "dit.pth")] = tmp_path / "nope.pth"
    code, _, err = script("convert_official.py", args, capsys)
    assert code == 2 and "file not found" in err


@pytest.mark.parametrize(
    "flag, name, content, match",
    [
        ("--dit", "dit.safetensors", b"\x08\x00\x00", "cannot load .* as safetensors"),
        ("--vae", "vae.safetensors", b"not safetensors", "cannot load .* as safetensors"),
        ("--dit-config", "c.json", b'{"dept": 2}', "bad --dit-config or --vae-config: .*dept"),
        ("--vae-config", "c.json", b'{"latent_channel": 4}', "bad --dit-config or --vae-config"),
        ("--t5", "t5", None, "--t5 .*: not a T5 encoder directory"),  # None: an empty directory
        ("--tokenizer", "tok", None, "--tokenizer .*: not a tokenizer directory"),
    ],
)
def test_convert_official_bad_files_exit_2_in_one_line(
    released, tmp_path, capsys, flag, name, content, match
):
    bad = tmp_path / "bad" / name
    bad.parent.mkdir()
    bad.mkdir() if content is None else bad.write_bytes(content)
    args = convert_args(released[0], tmp_path / "pipe")
    args[args.index(flag) + 1] = bad
    code, _, err = script("convert_official.py", args, capsys)
    assert code == 2 and re.search(match, err) and err.count("\n") == 1, err
    assert not (tmp_path / "pipe").exists()


def test_convert_official_names_a_resolution_the_file_contradicts(released, tmp_path, capsys):
    """Both released DiTs have the same shapes: only the name tells a 1024 px checkpoint
    converted with --resolution 512 (the 512 px RoPE budget and 20 steps) apart."""
    named = tmp_path / "ace_0.6b_1024px.pth"
    shutil.copy(released[0] / "dit.pth", named)
    args = convert_args(released[0], tmp_path / "pipe", 512)
    args[args.index(released[0] / "dit.pth")] = named
    code, _, err = script("convert_official.py", args, capsys)
    assert code == 2 and "is named for 1024 px but --resolution is 512" in err, err
    assert not (tmp_path / "pipe").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed"
)
def test_convert_official_says_what_a_sentencepiece_tokenizer_needs(released, tmp_path, capsys):
    """A T5 tokenizer directory with spiece.model alone (no tokenizer.json) needs the
    sentencepiece package; transformers' own error said tiktoken."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "spiece.model").write_bytes(b"\x00")
    args = convert_args(released[0], tmp_path / "pipe")
    args[args.index("--tokenizer") + 1] = tok
    code, _, err = script("convert_official.py", args, capsys)
    assert code == 2 and "needs the sentencepiece package" in err, err


def test_convert_official_refuses_a_t5_of_another_width(released, tmp_path, capsys):
    """T5-XL (2048 wide) given for the XXL the DiT reads: refused, not a pipeline that
    fails at its first call."""
    from transformers import T5Config, T5EncoderModel

    root = released[0]
    T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(tmp_path / "t5")  # fmt: skip
    args = convert_args(root, tmp_path / "pipe")
    args[args.index("--t5") + 1] = tmp_path / "t5"
    code, _, err = script("convert_official.py", args, capsys)
    assert code == 2 and f"gives 16-wide states and the DiT reads {TEXT_DIM}" in err
    assert not (tmp_path / "pipe").exists()


def test_converted_pipeline_gets_umask_permissions(released, tmp_path, capsys):
    out = tmp_path / "pipe"
    old = os.umask(0o022)
    try:
        assert script("convert_official.py", convert_args(released[0], out), capsys)[0] == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # mkdtemp gave 0700


def test_pipeline_built_directly_matches_converted(released, tmp_path, capsys):
    root, ref, vae, tokenizer, t5, dit_cfg = released
    out = tmp_path / "ace-512"
    assert script("convert_official.py", convert_args(root, out), capsys)[0] == 0
    loaded = ACEPipeline.from_pretrained(out)
    from ace.convert import official_dit_to_ace
    from ace.models import ACETransformer

    transformer = ACETransformer(**dit_cfg)
    transformer.load_state_dict(official_dit_to_ace(ref.state_dict()))
    direct = ACEPipeline(transformer, vae, t5, tokenizer, DDPMEpsilon().make_scheduler())
    kw = dict(height=32, width=32, num_inference_steps=2)
    a = loaded("a star", generator=torch.Generator().manual_seed(0), **kw).images[0]
    b = direct("a star", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
