"""ace.data.collect.annotators and scripts/annotate.py, against independent references."""

import doctest
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _scripts import run_script
from PIL import Image
from transformers import (
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
)

from ace.data import toy
from ace.data.collect.annotators import (
    ANNOTATORS,
    DepthAnnotator,
    SegmentationAnnotator,
    canny,
    grayscale,
    lcu_records,
    palette_color,
    soft_edges,
)
from ace.data.manifest import LCUManifest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "annotate.py"


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth_noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """Noise upsampled: soft gradients, not only pixel-level jumps."""
    return noise(w // 4 + 1, h // 4 + 1, seed).resize((w, h), Image.BILINEAR)


# ------------------------------------------------------------------------- low-level maps


def test_canny_is_the_toy_worlds_edge_map():
    for sample in toy.sample_stream(6, seed=0, tasks="edge_map"):
        (image,) = sample.lcu.current.images
        assert canny(image).tobytes() == sample.lcu.target.tobytes()  # edges of its input
    for sample in toy.sample_stream(4, seed=1, tasks="edge_to_image", size=96):
        (edges,) = sample.lcu.current.images
        assert canny(sample.lcu.target).tobytes() == edges.tobytes()
    out = np.asarray(canny(smooth_noise(50, 30), low=10, high=30))
    assert out.shape == (30, 50, 3) and set(np.unique(out)) <= {0, 255}
    assert (out[..., 0] == out[..., 2]).all() and out.any()
    with pytest.raises(ValueError, match="low <= high"):
        canny(noise(8, 8), low=50, high=10)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = int(4 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _correlate(a: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """1-D correlation along ``axis``, borders mirrored without the edge pixel."""
    r = len(k) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="reflect")
    n = a.shape[axis]
    return sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))


def soft_edges_reference(image: Image.Image, sigma: float) -> np.ndarray:
    """Float64 numpy: 601 gray, Gaussian, Sobel magnitude, scaled to a maximum of 255."""
    a = np.asarray(image.convert("RGB"), np.float64)
    gray = 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
    k = _gaussian_kernel(sigma)
    s = _correlate(_correlate(gray, k, 0), k, 1)
    d, w = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    gx = _correlate(_correlate(s, d, 1), w, 0)
    gy = _correlate(_correlate(s, d, 0), w, 1)
    m = np.hypot(gx, gy)
    return np.rint(m / m.max() * 255)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_soft_edges_match_a_numpy_reference(sigma):
    images = [smooth_noise(61, 37, 1), noise(40, 44, 2), next(toy.sample_stream(1, 3)).lcu.target]
    for image in images:
        out = np.asarray(soft_edges(image, sigma=sigma))
        assert out.shape == (image.height, image.width, 3) and out.dtype == np.uint8
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        diff = np.abs(out[..., 0].astype(int) - soft_edges_reference(image, sigma))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.995, (diff.max(), (diff == 0).mean())
        assert out.max() == 255
    assert not np.asarray(soft_edges(Image.new("RGB", (9, 7), (3, 4, 5)))).any()  # flat: black
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        soft_edges(images[0], sigma=0)


def test_grayscale_is_the_601_luma():
    for image in (
        noise(33, 17, 4),
        noise(8, 8, 5).convert("RGBA"),
        Image.new("RGB", (3, 3), (1, 2, 3)),
    ):
        a = np.asarray(image.convert("RGB"), np.float64)
        luma = np.floor(a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114 + 0.5)
        out = np.asarray(grayscale(image))
        assert out.shape == (*luma.shape, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], luma)
        assert grayscale(image).tobytes() == toy.grayscale(image).tobytes()


# ----------------------------------------------------------------------------- model maps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random DPT (depth) and Segformer (5 labels), saved and kept in memory."""
    tmp = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dpt = DPTForDepthEstimation(
        DPTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 8, 16, 16],
            fusion_hidden_size=16,
            reassemble_factors=[4, 2, 1, 0.5],
            head_in_index=-1,
        )
    ).eval()
    dpt_proc = DPTImageProcessor(size={"height": 32, "width": 32})
    seg = SegformerForSemanticSegmentation(
        SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            downsampling_rates=[1, 4],
            num_attention_heads=[1, 2],
            decoder_hidden_size=16,
            num_labels=5,
            image_size=32,
        )
    ).eval()
    seg_proc = SegformerImageProcessor(size={"height": 32, "width": 32})
    for name, model, proc in (("dpt", dpt, dpt_proc), ("seg", seg, seg_proc)):
        model.save_pretrained(tmp / name)
        proc.save_pretrained(tmp / name)
    return SimpleNamespace(
        dpt=dpt,
        dpt_proc=dpt_proc,
        seg=seg,
        seg_proc=seg_proc,
        dpt_path=tmp / "dpt",
        seg_path=tmp / "seg",
    )


def test_depth_map(models):
    annotate = DepthAnnotator(models.dpt_path)
    image = smooth_noise(56, 40, 6)
    out = np.asarray(annotate(image))
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255
    # by hand: the model on the processor's pixels, resized to the image (bicubic), min-max
    pixels = models.dpt_proc(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        depth = models.dpt(pixel_values=pixels).predicted_depth  # (1, h, w)
    depth = F.interpolate(depth[:, None], (40, 56), mode="bicubic", align_corners=False)[0, 0]
    d = depth.numpy().astype(np.float64)
    ref = np.rint((d - d.min()) / (d.max() - d.min()) * 255)
    assert np.abs(out[..., 0] - ref).max() <= 1


def test_segmentation_map_colours_follow_the_palette(models):
    annotate = SegmentationAnnotator(models.seg_path, palette={"LABEL_1": (1, 2, 3)})
    colors = [(1, 2, 3) if i == 1 else palette_color(i) for i in range(5)]
    assert annotate.colors == {f"LABEL_{i}": c for i, c in enumerate(colors)}
    image = smooth_noise(50, 34, 7)
    out = np.asarray(annotate(image))
    assert out.shape == (34, 50, 3) and out.dtype == np.uint8
    # by hand: logits resized to the image (bilinear), argmax, the label's colour
    pixels = models.seg_proc(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = models.seg(pixel_values=pixels).logits  # (1, L, h, w)
    labels = F.interpolate(logits, (34, 50), mode="bilinear", align_corners=False)[0].argmax(0)
    ref = np.array(colors, np.uint8)[labels.numpy()]  # (H, W, 3)
    assert (out == ref).all(axis=2).mean() > 0.999
    assert len(np.unique(labels)) > 1  # the check saw more than one label
    with pytest.raises(ValueError, match="palette names 'sky', not a label"):
        SegmentationAnnotator(models.seg_path, palette={"sky": (0, 0, 255)})
    with pytest.raises(ValueError, match=re.escape("need 3 ints in 0..255")):
        SegmentationAnnotator(models.seg_path, palette={"LABEL_0": (0, 0, 256)})


def test_palette_is_never_black_and_refuses_indices_past_its_colours():
    last = 2**24 - 2  # 2**24 - 1 colours besides black
    assert palette_color(last) == (255, 255, 255) and palette_color(last - 1) != (0, 0, 0)
    for bad in (-1, last + 1):
        with pytest.raises(ValueError, match=f"palette index must be in 0..{last}, got {bad}"):
            palette_color(bad)


def test_palette_and_missing_models(tmp_path):
    colors = [palette_color(i) for i in range(1000)]
    assert len(set(colors)) == 1000 and (0, 0, 0) not in colors
    for cls in (DepthAnnotator, SegmentationAnnotator):
        with pytest.raises(
            ValueError, match=re.escape(f"model path {tmp_path / 'no'} does not exist")
        ):
            cls(tmp_path / "no")
        with pytest.raises(
            ValueError, match=r"cannot load an? (depth-estimation|image-segmentation) model from"
        ):
            cls(tmp_path)


def test_registry_and_records():
    assert list(ANNOTATORS) == ["canny", "soft_edges", "grayscale", "depth", "segmentation"]
    for name, spec in ANNOTATORS.items():
        assert spec.name == name and spec.needs_model == (name in ("depth", "segmentation"))
        for text in (spec.analysis_instruction, spec.generation_instruction):
            assert re.findall(r"\{image\d*\}", text) == ["{image}"]
    assert ANNOTATORS["canny"].analysis_task == "edge_map" and "edge_map" in toy.TASKS
    assert ANNOTATORS["segmentation"].generation_task == "segmentation_to_image"
    image = smooth_noise(20, 20)
    assert ANNOTATORS["canny"].build()(image).tobytes() == canny(image).tobytes()
    assert ANNOTATORS["soft_edges"].settings == {"sigma": 1.0}
    a, g = lcu_records("im/x.jpg", "maps/depth/x.png", "depth")
    assert a["turns"][0]["images"] == ["im/x.jpg"] and a["target"] == "maps/depth/x.png"
    assert g["turns"][0]["images"] == ["maps/depth/x.png"] and g["target"] == "im/x.jpg"
    assert (a["task"], g["task"]) == ("depth_map", "depth_to_image")
    assert a["meta"] == g["meta"] == {"annotator": "depth"}
    assert lcu_records("a", "b", "canny", meta={"id": "x"})[0]["meta"] == {
        "annotator": "canny",
        "id": "x",
    }
    assert lcu_records("a", "b", "canny", ["generation"])[0]["task"] == "edge_to_image"
    with pytest.raises(ValueError, match="unknown direction"):
        lcu_records("a", "b", "canny", ["sideways"])


# ----------------------------------------------------------------------- scripts/annotate.py


def run(argv, capsys):
    return run_script(SCRIPT, argv, capsys)


@pytest.fixture
def photos(tmp_path):
    """Four images: toy renders and noise, nested, png and jpg, one RGBA."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    samples = list(toy.sample_stream(2, seed=5, tasks="text_to_image"))
    samples[0].lcu.target.save(root / "a.png")
    samples[1].lcu.target.save(root / "sub" / "b.jpg", quality=95)
    noise(40, 24, 8).convert("RGBA").save(root / "sub" / "c.png")
    smooth_noise(36, 36, 9).save(root / "d.webp", lossless=True)
    (root / "notes.txt").write_text("not an image")
    return root


def maps_of(out):
    return {
        p.relative_to(out).as_posix(): p.stat().st_mtime_ns
        for p in (out / "maps").rglob("*")
        if p.is_file()
    }


def test_cli_writes_maps_and_a_valid_lcu_dataset(photos, models, tmp_path, capsys):
    out = tmp_path / "out"
    names = "canny,soft_edges,grayscale,depth,segmentation"
    argv = [
        "--images",
        photos,
        "--out",
        out,
        "--annotators",
        names,
        "--depth-model",
        models.dpt_path,
        "--seg-model",
        models.seg_path,
        "--quiet",
    ]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "wrote 20 maps (0 already there)" in stdout and "wrote 40 LCUs" in stdout
    stems = ["a", "d", "sub/b", "sub/c"]
    assert sorted(maps_of(out)) == sorted(
        f"maps/{n}/{s}.png" for n in names.split(",") for s in stems
    )
    ds = LCUManifest(out)
    assert ds.validate() == [] and len(ds) == 40
    assert ds.tasks == Counter(
        {
            t: 4
            for n in names.split(",")
            for t in (ANNOTATORS[n].analysis_task, ANNOTATORS[n].generation_task)
        }
    )
    first = ds.records[0]
    assert first["meta"] == {"annotator": "canny", "id": "a.png"}
    assert (
        first["turns"][0]["images"] == ["../photos/a.png"] and first["target"] == "maps/canny/a.png"
    )
    lcu = ds[0]  # image -> its Canny map, as the library draws it
    assert lcu.target.tobytes() == canny(lcu.current.images[0]).tobytes()
    b = Image.open(photos / "sub" / "b.jpg").convert("RGB")
    assert Image.open(out / "maps/grayscale/sub/b.png").tobytes() == grayscale(b).tobytes()
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    settings = json.loads((out / "annotate.json").read_text())
    assert settings["depth"] == {"model": str(models.dpt_path.resolve())}

    # a rerun skips every map; a deleted map is the only one redone
    before = maps_of(out)
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "wrote 0 maps (20 already there)" in stdout and maps_of(out) == before
    (out / "maps/depth/sub/c.png").unlink()
    code, stdout, _ = run([*argv, "--lcu", "analysis"], capsys)
    assert code == 0 and "wrote 1 maps (19 already there)" in stdout
    after = maps_of(out)
    assert {k for k in after if after[k] != before.get(k)} == {"maps/depth/sub/c.png"}
    assert LCUManifest(out).tasks == Counter(
        {ANNOTATORS[n].analysis_task: 4 for n in names.split(",")}
    )


def test_cli_copy_images_and_no_lcus(photos, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(
        [
            "--images",
            photos,
            "--out",
            out,
            "--annotators",
            "grayscale",
            "--lcu",
            "generation",
            "--copy-images",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    ds = LCUManifest(out)
    assert ds.validate() == [] and ds.tasks == Counter({"colorize": 4})
    assert ds.records[2]["target"] == "images/sub/b.jpg"
    assert (out / "images/sub/b.jpg").read_bytes() == (photos / "sub/b.jpg").read_bytes()
    out2 = tmp_path / "maps-only"
    code, stdout, _ = run(["--images", photos, "--out", out2, "--lcu", "none", "--quiet"], capsys)
    assert code == 0 and "LCUs" not in stdout
    assert not (out2 / "manifest.jsonl").exists() and len(maps_of(out2)) == 12


def test_cli_bad_input_exits_2_with_one_line(photos, models, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--images", photos, "--out", out, "--quiet"]
    for extra, message in [
        (["--annotators", "canny,blur"], "unknown annotator(s) ['blur']"),
        (["--annotators", "canny,canny"], "names one twice"),
        (["--annotators", "depth"], "the depth annotator needs --depth-model"),
        (["--annotators", "depth", "--depth-model", tmp_path / "nope"], "does not exist"),
        (["--seg-model", models.seg_path], "--seg-model is given but segmentation is not"),
        (["--lcu", "sideways"], "argument --lcu: invalid choice"),
        (
            ["--annotators", "segmentation", "--seg-model", tmp_path],
            "cannot load an image-segmentation model",
        ),
    ]:
        code, _, err = run([*base, *extra], capsys)
        assert code == 2 and err.startswith("annotate.py: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists(), extra
    for argv, message in [
        (["--out", out], "the following arguments are required: --images"),
        (["--images", tmp_path / "none", "--out", out], "is not a directory"),
        (["--images", photos, "--out", photos / "maps"], "is inside --images"),
        (["--images", tmp_path / "out", "--out", tmp_path / "o2"], "is not a directory"),
    ]:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    # a corrupt image: named; the maps before it are complete, no manifest, no temporary file
    (photos / "sub" / "b.jpg").write_bytes(b"\xff\xd8 broken")
    code, _, err = run([*base, "--annotators", "canny"], capsys)
    assert code == 2 and f"unreadable image {photos / 'sub' / 'b.jpg'}" in err
    assert sorted(maps_of(out)) == ["maps/canny/a.png", "maps/canny/d.png"]
    assert not (out / "manifest.jsonl").exists() and not [p for p in out.rglob(".*")]
    # other settings for maps already there are refused
    (photos / "sub" / "b.jpg").unlink()
    code, _, _ = run([*base, "--annotators", "depth", "--depth-model", models.dpt_path], capsys)
    assert code == 0
    code, _, err = run([*base, "--annotators", "depth", "--depth-model", models.seg_path], capsys)
    assert code == 2 and "holds depth maps made with" in err
    # settings recorded by a run stopped before its first map of them refuse nothing
    shutil.rmtree(out / "maps" / "depth")
    recorded = json.loads((out / "annotate.json").read_text())
    recorded["depth"]["model"] = "/a/model/that/made/no/map"
    (out / "annotate.json").write_text(json.dumps(recorded))
    code, _, err = run([*base, "--annotators", "depth", "--depth-model", models.dpt_path], capsys)
    assert code == 0, err
    assert json.loads((out / "annotate.json").read_text())["depth"] != recorded["depth"]


def test_docstring_examples():
    from ace.data.collect import annotators

    assert doctest.testmod(annotators).failed == 0


def test_every_annotator_task_has_templates():
    """write_instructions.py --mode template can rephrase whatever annotate.py writes."""
    from ace.data.collect.instructions import TASK_IMAGES, template_instruction

    for spec in ANNOTATORS.values():
        for task in (spec.analysis_task, spec.generation_task):
            assert TASK_IMAGES[task] == 1
            assert "{image}" in template_instruction(task, 0)  # no slot needed


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 1 x 1 depth
def test_a_model_that_cannot_read_an_image_is_one_line_naming_it(models, tmp_path, capsys):
    """A 1 x 1 image made the depth pipeline raise IndexError: a traceback, exit 1."""
    images = tmp_path / "tiny"
    images.mkdir()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(images / "dot.png")
    out = tmp_path / "out"
    argv = ["--images", images, "--out", out, "--annotators", "depth"]
    code, _, err = run([*argv, "--depth-model", models.dpt_path, "--quiet"], capsys)
    last = err.strip().splitlines()[-1]  # after transformers' weight-loading bar
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith(f"annotate.py: error: depth failed on {images / 'dot.png'}: ")
    assert not list((out / "maps").rglob("*.png"))
