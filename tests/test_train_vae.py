"""ace.train.vae and scripts/train_vae.py on tiny configs and a few toy images."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _scripts import run_script
from diffusers import AutoencoderKL

from ace.data.manifest import write_manifest
from ace.data.toy import (
    BACKGROUND_COLORS,
    CELLS,
    COLORS,
    PATTERNS,
    SHAPES,
    TASKS,
    Background,
    Obj,
    Scene,
    edge_map,
    render,
    sample_stream,
    segmentation_map,
)
from ace.train import vae as vae_module
from ace.train.vae import (
    TOY_VAE_SWATCHES,
    TOY_VAE_WEIGHTS,
    load_images,
    palette,
    palette_error,
    reconstruction_psnr,
    reconstructions,
    swatches,
    toy_images,
    toy_vae_config,
    toy_vae_mismatch,
    train_toy_vae,
    train_vae,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_vae.py"


def tiny_config(latent_channels: int = 4) -> dict:
    return {
        **toy_vae_config(latent_channels),
        "block_out_channels": (8, 8, 16),
        "norm_num_groups": 4,
        "sample_size": 32,
    }


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return toy_images(8, seed=0, size=32)  # (8, 3, 32, 32) uint8


@pytest.fixture(scope="module")
def trained(images):
    """A tiny VAE overfitted on 8 images, with the loss of every step."""
    losses = []
    vae = train_vae(
        images, steps=60, batch_size=8, lr=3e-3, warmup=5, config=tiny_config(),
        callback=lambda step, vae, logs: losses.append(logs["loss"]), progress=False,
    )  # fmt: skip
    return vae, losses


def test_toy_vae_config_downsamples_by_4_into_8_channels():
    vae = AutoencoderKL(**toy_vae_config())
    z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (1, 8, 16, 16)
    assert toy_vae_config(4)["latent_channels"] == 4


def test_loss_falls_by_a_large_factor(trained):
    vae, losses = trained
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] / 4, (losses[0], losses[-5:])
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_scaling_factor_gives_unit_std_latents(trained, images):
    vae, _ = trained
    x = images.float() / 127.5 - 1  # (8, 3, 32, 32) in [-1, 1]
    gen = torch.Generator().manual_seed(1)
    z = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    assert 0.9 < z.std().item() < 1.1
    assert vae.config.scaling_factor != 1.0


def test_same_seed_same_weights_other_seed_other_weights(images):
    def run(seed, **kw):
        vae = train_vae(images, steps=2, batch_size=3, seed=seed, config=tiny_config(), progress=False, **kw)  # fmt: skip
        return torch.cat([p.flatten() for p in vae.parameters()])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(run(0, device="cpu"), a)  # naming the device changes nothing
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_channels_last_and_fused_adamw_change_nothing_but_rounding(images, monkeypatch):
    """train_vae's speed-ups (NHWC convolutions on CPU, the fused AdamW kernel) train the
    same VAE as the plain layout and torch's per-parameter loop, to rounding, and hand it
    back in the usual layout (safetensors saves contiguous tensors). Weights are compared
    through what they compute: Adam turns a rounding-sized gradient into an lr-sized step."""

    def run():
        losses = []
        vae = train_vae(
            images, steps=6, batch_size=4, config=tiny_config(), progress=False,
            callback=lambda step, vae, logs: losses.append(logs["loss"]),
        )  # fmt: skip
        return vae, losses

    plain_adamw, asked = torch.optim.AdamW, []

    def spy(*a, **k):
        asked.append(k.get("fused"))
        return plain_adamw(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    fast, fast_losses = run()
    assert asked == [True]
    assert all(p.is_contiguous() for p in fast.parameters())
    monkeypatch.setattr(torch, "channels_last", torch.contiguous_format)
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, fused, **k: plain_adamw(*a, **k))
    plain, plain_losses = run()
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    assert fast_losses[-1] < fast_losses[0] * 0.8  # it trained: the comparison means something
    torch.testing.assert_close(reconstructions(fast, images)[1], reconstructions(plain, images)[1], rtol=0, atol=1e-3)  # fmt: skip
    assert fast.config.scaling_factor == pytest.approx(plain.config.scaling_factor, rel=1e-4)


def test_a_failed_run_hands_the_vae_back_in_the_usual_layout(images, monkeypatch):
    vae = AutoencoderKL(**tiny_config())

    def stop(step, vae, logs):
        assert not vae.encoder.conv_in.weight.is_contiguous()  # NHWC while training
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        train_vae(images, steps=3, vae=vae, callback=stop, progress=False)
    assert all(p.is_contiguous() for p in vae.parameters())
    nan = (torch.tensor(float("nan")), {})
    monkeypatch.setattr(vae_module, "vae_loss", lambda *a: nan)
    with pytest.raises(ValueError, match="non-finite VAE loss nan at step 1; lower lr"):
        train_vae(images, steps=3, vae=vae, progress=False)
    assert all(p.is_contiguous() for p in vae.parameters())


def test_psnr_matches_a_direct_computation(trained, images):
    vae, _ = trained
    x = images.float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample.add(1).div(2).clamp(0, 1)
    mse = (y - images.float() / 255).square().mean().item()
    assert reconstruction_psnr(vae, images, batch_size=3) == pytest.approx(-10 * math.log10(mse))
    originals, recon = reconstructions(vae, images)
    assert torch.allclose(recon, y, atol=1e-6) and torch.equal(originals, images.float() / 255)


class _StandInVAE(torch.nn.Module):
    """Encodes an image as itself; decodes it as all zeros (mid-grey), or as itself with
    ``shift`` added to channel 1 (green), in [-1, 1] units."""

    def __init__(self, shift: float | None):
        super().__init__()
        self.shift = shift
        self.register_buffer("anchor", torch.zeros(()))
        self.device, self.dtype = self.anchor.device, self.anchor.dtype

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        if self.shift is None:
            return SimpleNamespace(sample=torch.zeros_like(z))
        return SimpleNamespace(sample=z + torch.tensor([0.0, self.shift, 0.0]).view(1, 3, 1, 1))


def test_palette_error_by_hand():
    """Mid-grey for everything: each colour's error is its channel farthest from 0.5. A
    green shift of -0.2 in [-1, 1] is -0.1 in [0, 1] on every colour (none clips)."""
    grey = palette_error(_StandInVAE(None))
    far = [max(abs(v / 255 - 0.5) for v in rgb) for rgb in BACKGROUND_COLORS.values()]
    assert grey["background"] == pytest.approx(sum(far) / len(far), abs=1e-6)
    far_objects = [max(abs(v / 255 - 0.5) for v in rgb) for rgb in COLORS.values()]
    assert grey["object"] == pytest.approx(sum(far_objects) / len(far_objects), abs=1e-6)
    assert grey["worst"] == pytest.approx(max(far + far_objects), abs=1e-6)
    shifted = palette_error(_StandInVAE(-0.2))
    assert shifted == pytest.approx({"background": 0.1, "object": 0.1, "worst": 0.1}, abs=1e-6)
    with pytest.raises(ValueError, match="impossible image size 40"):
        palette_error(_StandInVAE(None), size=40)


def _colours(image) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.asarray(image).reshape(-1, 3)}


def test_palette_is_every_flat_colour_the_toy_world_draws():
    """The palette against the colours found in rendered images: every background colour
    and pattern with every object colour, the segmentation map of every shape, and an
    edge map (white on black)."""
    seen = set()
    for color in BACKGROUND_COLORS:
        for pattern in PATTERNS:
            objects = [Obj("square", c, "small", cell) for c, cell in zip(COLORS, CELLS)]
            seen |= _colours(render(Scene(Background(color, pattern), objects)))
    shapes = [Obj(shape, "red", "small", cell) for shape, cell in zip(SHAPES, CELLS)]
    scene = Scene(Background("white", "stripes"), shapes)
    seen |= _colours(segmentation_map(scene)) | _colours(edge_map(render(scene)))
    assert _colours(palette()) == seen
    assert palette().dtype == np.uint8 and len(palette()) == len(seen)


def test_swatches_are_palette_rectangles_on_the_8px_grid():
    a = swatches(64, seed=0)
    assert a.shape == (64, 3, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, swatches(64, seed=0)) and not torch.equal(a, swatches(64, seed=1))
    blocks = a.reshape(64, 3, 8, 8, 8, 8)  # (n, 3, row block, y, column block, x)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()  # each 8 x 8 block is one colour
    colours = set().union(*(_colours(x.permute(1, 2, 0)) for x in a))
    assert colours == _colours(palette())  # only palette colours, and in 64 images all 28
    per_image = [len(_colours(x.permute(1, 2, 0))) for x in a]
    assert min(per_image) >= 1 and max(per_image) <= 16 and np.mean(per_image) > 3
    for size in (16, 24, 32):  # 16 and 24 have one and two places to cut
        assert swatches(8, size=size).shape == (8, 3, size, size)
    for kwargs, match in [({"n": 0}, "n must be"), ({"n": 2, "size": 20}, "size must be")]:
        with pytest.raises(ValueError, match=match):
            swatches(**kwargs)


def test_train_toy_vae_mixes_in_swatches_after_the_toy_images(tmp_path, monkeypatch):
    seen = []

    def spy(images, **kwargs):
        seen.append(images)
        return train_vae(images, **kwargs)

    monkeypatch.setattr(vae_module, "train_vae", spy)
    info = train_toy_vae(tmp_path / "vae", steps=1, n_images=8, eval_images=1, batch_size=8, progress=False, swatch_fraction=0.5)  # fmt: skip
    assert info["swatch_fraction"] == 0.5
    assert info["train_images"] == 8
    assert torch.equal(seen[0][:4], toy_images(4, seed=0, weights=TOY_VAE_WEIGHTS))
    assert torch.equal(seen[0][4:], swatches(4, seed=0))
    info = train_toy_vae(tmp_path / "vae", steps=1, n_images=8, eval_images=1, batch_size=8, progress=False)  # fmt: skip
    assert TOY_VAE_SWATCHES == 0 and info["swatch_fraction"] == 0  # the demo's: none
    assert torch.equal(seen[1], toy_images(8, seed=0, weights=TOY_VAE_WEIGHTS))
    for bad in (1, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="swatch_fraction"):
            train_toy_vae(tmp_path / "bad", steps=1, swatch_fraction=bad, progress=False)
    assert not (tmp_path / "bad").exists()


def test_train_toy_vae_trains_and_scores_at_the_size_asked(tmp_path, monkeypatch):
    seen = []

    def spy(images, **kwargs):
        seen.append((images, kwargs["config"]))
        return train_vae(images, **kwargs)

    scored = []
    real_measurements = vae_module.measurements
    monkeypatch.setattr(vae_module, "train_vae", spy)
    monkeypatch.setattr(vae_module, "measurements", lambda vae, held_out: scored.append(held_out) or real_measurements(vae, held_out))  # fmt: skip
    info = train_toy_vae(tmp_path / "vae", steps=1, n_images=4, eval_images=2, batch_size=4, progress=False, size=32)  # fmt: skip
    assert torch.equal(seen[0][0], toy_images(4, seed=0, size=32, weights=TOY_VAE_WEIGHTS))
    assert torch.equal(scored[0], toy_images(2, seed=0, split="eval", size=32))  # scored there
    assert seen[0][1]["sample_size"] == 32 and info["size"] == 32
    assert AutoencoderKL.load_config(tmp_path / "vae")["sample_size"] == 32
    with pytest.raises(ValueError, match="size must be"):
        train_toy_vae(tmp_path / "bad", steps=1, size=20, progress=False)
    assert not (tmp_path / "bad").exists()


def test_toy_vae_mismatch_reads_steps_and_size_from_training_json(tmp_path):
    train_toy_vae(tmp_path / "vae", steps=1, n_images=8, eval_images=2, progress=False, size=32)
    assert toy_vae_mismatch(tmp_path / "vae", steps=1, size=32) is None
    assert toy_vae_mismatch(tmp_path / "vae", steps=1, size=32, seed=3) == "seed 0, not 3"
    info = json.loads((tmp_path / "vae" / "training.json").read_text())
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "training.json").write_text(json.dumps({**info, "batch_size": 4, "data": "mine"}))  # fmt: skip
    assert toy_vae_mismatch(tmp_path / "odd", 1, 32) == "batch_size 4, not 8; trained on mine, not the toy world"  # fmt: skip
    assert toy_vae_mismatch(tmp_path / "vae", steps=4000, size=32) == "1 steps, not 4000 steps"
    assert toy_vae_mismatch(tmp_path / "vae", 1, 64) == "32 px, not 64 px"
    assert toy_vae_mismatch(tmp_path / "vae", 2, 64) == "1 steps, not 2 steps; 32 px, not 64 px"
    # nothing to compare: no training.json, one that is not JSON or not an object, no keys
    other = tmp_path / "other"
    other.mkdir()
    assert toy_vae_mismatch(other, 4000, 32) is None
    for text in ["{trunc", "[1000, 32]", '{"psnr_db": 20.0}']:
        (other / "training.json").write_text(text)
        assert toy_vae_mismatch(other, 4000, 32) is None


def test_save_load_round_trip_decodes_identically(trained, tmp_path):
    vae, _ = trained
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert loaded.config.scaling_factor == vae.config.scaling_factor
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_load_images_reads_lcus_and_manifests_in_the_same_order(tmp_path):
    lcus = [s.lcu for s in sample_stream(3, seed=0, size=32)]
    write_manifest(lcus, tmp_path / "set", progress=False)
    from_manifest = load_images(tmp_path / "set")
    assert torch.equal(from_manifest, load_images(lcus))
    assert len(from_manifest) == sum(len(lcu.images) + 1 for lcu in lcus)
    assert torch.equal(load_images(lcus, limit=2), from_manifest[:2])
    assert torch.equal(toy_images(4, seed=0, size=32), from_manifest[:4])
    # weights pick the task mix: only edge maps, here
    only_edges = {t: float(t == "edge_map") for t in TASKS}
    edges = [s.lcu for s in sample_stream(2, seed=0, size=32, weights=only_edges)]
    assert {lcu.task for lcu in edges} == {"edge_map"}
    assert torch.equal(toy_images(4, seed=0, size=32, weights=only_edges), load_images(edges))
    floats = load_images([from_manifest[0].float() / 255])  # (3, H, W) in [0, 1]
    assert torch.equal(floats[0], from_manifest[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": -1}, "seed"),
        ({"kl_weight": -1e-6}, "kl_weight"),
        ({"l1_weight": 0, "mse_weight": 0}, "both 0"),
        ({"warmup": -1}, "warmup"),
        ({"config": {}, "vae": "x"}, "not both"),
    ],
)
def test_train_vae_rejects_bad_arguments(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_vae(images, **{"config": tiny_config(), "progress": False, **kwargs})


@pytest.mark.parametrize(
    "source, match",
    [
        ([], "empty"),
        (["not an image"], "item 0"),
        ([torch.zeros(3, 32, 32), torch.zeros(3, 64, 64)], "one size"),
        ([torch.zeros(3, 36, 36)], "multiple of 8"),
        (torch.zeros(2, 1, 32, 32), r"\(N, 3, H, W\)"),
        ([torch.rand(3, 32, 32) * 2 - 1], r"in \[0, 1\], got values in \[-"),  # the DiT's range
        ([torch.rand(3, 32, 32) * 255], r"in \[0, 1\]"),
        ([torch.full((3, 8, 8), float("nan"))], r"in \[0, 1\]"),
    ],
)
def test_load_images_rejects_bad_sources(source, match):
    with pytest.raises(ValueError, match=match):
        load_images(source)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="latent_channels"):
        toy_vae_config(0)
    with pytest.raises(ValueError, match="size must be"):
        toy_vae_config(8, 12)
    with pytest.raises(FileNotFoundError):
        load_images("/nonexistent/manifest")


# ---------------------------------------------------------------------------- the script


def script(argv, capsys):
    return run_script(SCRIPT, argv, capsys)


def test_script_trains_scores_and_saves(tmp_path, capsys):
    out = tmp_path / "vae"
    argv = ["--out", out, "--steps", 2, "--batch-size", 2, "--n-images", 4, "--eval-images", 2, "--quiet"]  # fmt: skip
    code, stdout, _ = script(argv, capsys)
    assert code == 0 and "PSNR on 2 held-out toy images" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "training.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]  # no temporary left
    info = json.loads((out / "training.json").read_text())
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.latent_channels == 8 and vae.config.scaling_factor == info["scaling_factor"]
    assert info["train_images"] == 4 and math.isfinite(info["psnr_db"])
    assert info["weights"] == TOY_VAE_WEIGHTS  # the demo VAE's mix, recorded
    assert info["swatch_fraction"] == TOY_VAE_SWATCHES
    assert info["device"] == "cpu" and set(info["palette_error"]) == {
        "background",
        "object",
        "worst",
    }
    assert "palette error" in stdout

    code, _, err = script(argv, capsys)  # --out is not empty now
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    code, _, _ = script([*argv, "--overwrite", "--mix", "dit", "--swatches", "0.5", "--size", 32], capsys)  # fmt: skip
    info = json.loads((out / "training.json").read_text())
    assert code == 0 and info["weights"] == {} and info["swatch_fraction"] == 0.5
    assert info["size"] == 32 and AutoencoderKL.load_config(out)["sample_size"] == 32
    manifest = _manifest(tmp_path)
    code, _, _ = script([*argv, "--overwrite", "--device", "cpu", "--data", manifest], capsys)
    info = json.loads((out / "training.json").read_text())
    assert code == 0 and info["data"] and info["device"] == "cpu"
    assert info["size"] == 64  # the manifest's images' size, and so the held-out images'
    code, _, err = script([*argv, "--overwrite", "--data", manifest, "--size", 32], capsys)
    assert code == 2 and "with --data the images set it" in err


def _manifest(tmp_path: Path) -> Path:
    lcus = [s.lcu for s in sample_stream(2, seed=0)]
    return write_manifest(lcus, tmp_path / "data", progress=False).parent


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--steps", 0], "--steps must be at least 1"),
        (["--size", 40], "--size must be a multiple of 16"),
        (["--batch-size", -2], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--n-images", 0], "--n-images"),
        (["--seed", -1], "--seed"),
        (["--data", "/nonexistent/data"], "does not exist"),
        (["--data", ".", "--mix", "dit"], "cannot be used with --data"),
        (["--data", ".", "--swatches", "0.2"], "not with --data"),
        (["--swatches", "1"], "--swatches must be in [0, 1)"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        pytest.param(
            ["--device", "cuda"],
            "this machine has no cuda device",
            marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="needs a machine without CUDA"
            ),
        ),
    ],
)
def test_script_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, extra, match):
    out = tmp_path / "vae"
    code, _, err = script(["--out", out, "--steps", 1, *extra], capsys)
    assert code == 2 and match in err and err.startswith("train_vae.py: error:")
    assert err.count("\n") == 1 and not out.exists()


def test_script_bad_manifest_exits_2(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text("{not json\n")
    code, _, err = script(["--out", tmp_path / "vae", "--data", data], capsys)
    assert code == 2 and "invalid JSON" in err and not (tmp_path / "vae").exists()


def test_script_names_data_of_a_size_it_cannot_score_at(tmp_path, capsys):
    """Held-out toy images score the VAE at its data's size: 40 px images (a multiple of 8,
    so loadable) are refused naming --data, not as "impossible image size 40"."""
    from PIL import Image

    from ace.data.manifest import write_manifest
    from ace.lcu import LCU, ConditionUnit

    lcus = [LCU(ConditionUnit(f"a plain colour {i}"), target=Image.new("RGB", (40, 40), (i, 0, 0))) for i in range(2)]  # fmt: skip
    write_manifest(lcus, tmp_path / "data", progress=False)
    code, _, err = script(["--out", tmp_path / "vae", "--data", tmp_path / "data", "--steps", 1], capsys)  # fmt: skip
    assert code == 2 and "--data" in err and "its images are 40x40 px" in err, err
    assert not (tmp_path / "vae").exists()


def test_script_failing_save_leaves_nothing(tmp_path, capsys, monkeypatch):
    def broken(self, path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", broken)
    argv = ["--out", tmp_path / "vae", "--steps", 1, "--batch-size", 1, "--n-images", 1, "--eval-images", 1, "--quiet"]  # fmt: skip
    code, _, err = script(argv, capsys)
    assert code == 2 and "disk full" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_script_out_under_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import ace.train.vae

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(ace.train.vae, "train_vae", lambda *a, **k: pytest.fail("trained"))
    code, _, err = script(["--out", tmp_path / "afile" / "vae", "--steps", 1], capsys)
    assert code == 2 and "afile is not a directory" in err and err.count("\n") == 1


def test_save_vae_fills_an_empty_directory(tmp_path):
    """A directory made ahead is replaced by the saved VAE, nothing left beside it."""
    from ace.testing import tiny_vae
    from ace.train.vae import save_vae

    (tmp_path / "vae").mkdir()
    save_vae(tiny_vae(), tmp_path / "vae", {"steps": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    names = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.safetensors", "training.json"]
