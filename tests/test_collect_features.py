"""ace.data.collect.features: shards equal the encoder run by hand, resume, refusals, errors."""

import contextlib
import doctest
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

from ace.data.collect import features as feat
from ace.data.collect.features import (
    encode,
    extract_features,
    image_ids,
    list_images,
    num_shards,
    shards_of_rank,
)
from ace.data.collect.store import load_features, read_feature_shard, shard_name

SIZES = [(40, 30), (32, 32), (57, 21), (16, 48), (33, 33)]  # (W, H) of the 5 test images


def tiny_siglip(seed: int) -> SiglipModel:
    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=99, max_position_embeddings=16, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
    )
    return SiglipModel(cfg).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images under root (png/jpg, RGB/RGBA/L, nested), two saved encoders, the first in memory."""
    tmp = tmp_path_factory.mktemp("features")
    root = tmp / "images"
    rng = np.random.default_rng(0)
    names = ["a/0.png", "a/1.jpg", "b/c/2.png", "b/3.png", "z.PNG"]
    modes = ["RGB", "RGB", "RGBA", "L", "RGB"]
    for name, (w, h), mode in zip(names, SIZES, modes):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(root / name)
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    models = {}
    for seed in (0, 1):
        model = tiny_siglip(seed)
        model.save_pretrained(tmp / f"enc{seed}")
        processor.save_pretrained(tmp / f"enc{seed}")
        models[seed] = model
    images = [root / n for n in sorted(names)]
    return SimpleNamespace(
        root=root,
        images=images,
        ids=sorted(names),
        model=models[0],
        processor=processor,
        enc=tmp / "enc0",
        other=tmp / "enc1",
    )


def by_hand(world) -> np.ndarray:
    """(N, D) unit rows: the SigLIP vision tower run directly on the processor's pixels."""
    pil = [Image.open(p).convert("RGB") for p in world.images]
    pixels = world.processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        x = world.model.vision_model(pixel_values=pixels).pooler_output.numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shards(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("features-"))


def test_rows_equal_the_model_run_by_hand(world, tmp_path):
    out = tmp_path / "feats"
    paths = extract_features(
        world.images, out, world.enc, root=world.root, batch_size=3, shard_size=2, progress=False
    )
    assert [p.name for p in paths] == [shard_name(s) for s in range(3)] == shards(out)
    ids, x = load_features(out)
    assert ids == world.ids
    assert x.dtype == np.float32 and x.shape == (5, 32)
    np.testing.assert_allclose(x, by_hand(world), atol=1e-5)
    assert [read_feature_shard(p)[0] for p in paths] == [ids[0:2], ids[2:4], ids[4:]]
    meta = json.loads((out / "features.json").read_text())
    assert meta["model"] == str(world.enc.resolve()) and meta["dim"] == 32
    assert (meta["shard_size"], meta["count"], meta["dtype"]) == (2, 5, "float32")
    # without normalisation: the raw pooled features (a separate directory)
    extract_features(
        world.images, tmp_path / "raw", world.enc, root=world.root, normalize=False, progress=False
    )
    raw = load_features(tmp_path / "raw")[1]
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), x, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)


def test_interrupted_run_resumes_only_the_missing_shard(world, tmp_path, monkeypatch):
    out = tmp_path / "feats"
    extract_features(world.images, out, world.enc, root=world.root, shard_size=2, progress=False)
    before = {name: read_feature_shard(out / name) for name in shards(out)}
    (out / shard_name(1)).unlink()  # "interrupted" before shard 1 was written
    # the pairing step would mine the rest as if it were every image
    with pytest.raises(ValueError, match=r"holds 3 of the 5 features its features.json records"):
        load_features(out)
    mtimes = {s: (out / shard_name(s)).stat().st_mtime_ns for s in (0, 2)}
    loaded = []
    monkeypatch.setattr(
        feat, "load_image", lambda p: loaded.append(p) or Image.open(p).convert("RGB")
    )
    extract_features(world.images, out, world.enc, root=world.root, shard_size=2, progress=False)
    assert loaded == world.images[2:4]  # only shard 1's images were read
    assert {s: (out / shard_name(s)).stat().st_mtime_ns for s in (0, 2)} == mtimes
    after = {name: read_feature_shard(out / name) for name in shards(out)}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name][0] == before[name][0]
        np.testing.assert_array_equal(after[name][1], before[name][1])
    loaded.clear()  # a complete directory: nothing to do, the model is not even loaded
    monkeypatch.setattr(feat, "load_encoder", None)
    extract_features(world.images, out, world.enc, root=world.root, shard_size=2, progress=False)
    assert loaded == []


def test_float16(world, tmp_path):
    out = tmp_path / "half"
    (path,) = extract_features(
        world.images, out, world.enc, root=world.root, dtype="float16", progress=False
    )
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("features").dtype == torch.float16
    np.testing.assert_allclose(load_features(out)[1], by_hand(world), atol=2e-3)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_path="other"), "model="),
        (dict(shard_size=3), "shard_size=2, not 3"),
        (dict(images=slice(0, 4)), "count=5, not 4"),
        (dict(images=slice(None, None, -1)), "another image list"),
        (dict(dtype="float16"), "dtype="),
        (dict(normalize=False), "normalize="),
    ],
)
def test_resuming_with_other_settings_is_refused(world, tmp_path, change, message):
    out = tmp_path / "feats"
    extract_features(world.images, out, world.enc, root=world.root, shard_size=2, progress=False)
    kwargs = dict(root=world.root, shard_size=2, progress=False)
    kwargs |= {k: v for k, v in change.items() if k not in ("model_path", "images")}
    model = world.other if "model_path" in change else world.enc
    images = world.images[change.get("images", slice(None))]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ValueError, match=message):
        extract_features(images, out, model, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bad_input_names_it_and_writes_nothing(world, tmp_path):
    out = tmp_path / "feats"
    run = lambda images, model=world.enc, **kw: extract_features(  # noqa: E731
        images, out, model, root=world.root, progress=False, **kw
    )
    missing = world.root / "gone.png"
    for images, kw, message in [
        ([*world.images, missing], {}, f"missing image {missing}"),
        ([], {}, "the image list is empty"),
        (
            world.images,
            dict(model=tmp_path / "nope"),
            f"model path {tmp_path / 'nope'} does not exist",
        ),
        (world.images, dict(batch_size=0), "batch_size must be a positive int"),
        (world.images, dict(shard_size=1.5), "shard_size must be a positive int"),
        (world.images, dict(dtype="bfloat16"), "dtype must be one of float32, float16"),
        ([*world.images, world.images[0]], {}, "listed twice"),
        ([tmp_path / "x.png"], {}, "is not under the root"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            run(images, **kw)
        assert not out.exists()
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"cannot load an image encoder from {empty}"):
        run(world.images, model=empty)
    assert not out.exists()
    # a corrupt image: its shard is never written, no temporary file is left
    bad = tmp_path / "images"
    shutil.copytree(world.root, bad)
    (bad / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = list_images(bad)
    with pytest.raises(ValueError, match=f"unreadable image {bad / 'b' / '3.png'}"):
        extract_features(images, out, world.enc, root=bad, shard_size=2, progress=False)
    assert shards(out) == [shard_name(0)]  # shard 0 was complete before shard 1 failed
    assert sorted(p.name for p in out.iterdir()) == ["features-00000.safetensors", "features.json"]


class FakeAccelerator:
    """What extract_features uses of accelerate.Accelerator, for one rank of a fake world."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1

    def autocast(self):
        return contextlib.nullcontext()


def test_rank_split(world, tmp_path):
    assert shards_of_rank(7, 0, 3) == [0, 3, 6] and shards_of_rank(7, 2, 3) == [2, 5]
    assert sorted(s for r in range(4) for s in shards_of_rank(10, r, 4)) == list(range(10))
    assert num_shards(5, 2) == 3 and num_shards(4, 2) == 2 and num_shards(1, 4096) == 1
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shards_of_rank(3, 2, 2)
    # the two ranks of a 2-process world, one after the other: together, all the shards
    out = tmp_path / "two"
    ranks = [FakeAccelerator(0, 2), FakeAccelerator(1, 2)]
    for acc in ranks:
        extract_features(
            world.images,
            out,
            world.enc,
            root=world.root,
            shard_size=2,
            accelerator=acc,
            progress=False,
        )
        if acc.process_index == 0:
            assert shards(out) == [shard_name(0), shard_name(2)]
    assert [acc.barriers for acc in ranks] == [2, 2]
    extract_features(
        world.images,
        out,
        world.enc,
        root=world.root,
        shard_size=2,
        accelerator=ranks[1],
        progress=False,
    )
    assert ranks[1].barriers == 4  # a rank with nothing to do still meets the others
    assert shards(out) == [shard_name(s) for s in range(3)]
    ids, x = load_features(out)
    assert ids == world.ids
    np.testing.assert_allclose(x, by_hand(world), atol=1e-5)
    assert json.loads((out / "features.json").read_text())["dim"] == 32


def test_encode_fallbacks():
    pixels = torch.randn(2, 3, 4, 4)
    flat = pixels.flatten(1)  # (2, 48)

    class Features(torch.nn.Module):  # transformers 4 style: a tensor
        def get_image_features(self, pixel_values):
            return pixel_values.flatten(1) * 2

    class Pooled(torch.nn.Module):
        def forward(self, pixel_values):
            return SimpleNamespace(pooler_output=pixel_values[:, :, :1, :1])  # (B, C, 1, 1)

    class Hidden(torch.nn.Module):
        def forward(self, pixel_values):
            tokens = pixel_values.flatten(2).transpose(1, 2)  # (B, T, C)
            return SimpleNamespace(pooler_output=None, last_hidden_state=tokens)

    class Spatial(torch.nn.Module):
        def forward(self, pixel_values):
            return SimpleNamespace(last_hidden_state=pixel_values)  # (B, C, h, w)

    torch.testing.assert_close(encode(Features(), pixels), flat * 2)
    torch.testing.assert_close(encode(Pooled(), pixels), pixels[:, :, 0, 0])
    torch.testing.assert_close(encode(Hidden(), pixels), pixels.mean((2, 3)))
    torch.testing.assert_close(encode(Spatial(), pixels), pixels.mean((2, 3)))


def test_list_images_and_ids(tmp_path):
    for name in [
        "b/x.JPG",
        "a.png",
        "a.txt",
        ".hidden.png",
        ".cache/y.png",
        "b/c/z.webp",
        "c.jpeg",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = list_images(tmp_path)
    assert image_ids(found, tmp_path) == ["a.png", "b/c/z.webp", "b/x.JPG", "c.jpeg"]
    assert found[0] == tmp_path / "a.png"
    assert [p.name for p in list_images(tmp_path, suffixes=(".webp",))] == ["z.webp"]
    assert image_ids(["x/y.png"]) == ["x/y.png"]
    with pytest.raises(ValueError, match="is not a directory"):
        list_images(tmp_path / "a.png")
    # linked folders are followed (they were skipped: a collection of links held nothing),
    # a loop back up the tree ends there, and a folder reached twice is listed once
    links = tmp_path.parent / f"{tmp_path.name}-links"
    links.mkdir()
    (links / "set1").symlink_to(tmp_path / "b", target_is_directory=True)
    assert image_ids(list_images(links), links) == ["set1/c/z.webp", "set1/x.JPG"]
    (tmp_path / "b" / "c" / "up").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "z").symlink_to(tmp_path / "b", target_is_directory=True)
    assert image_ids(list_images(tmp_path), tmp_path) == ["a.png", "b/c/z.webp", "b/x.JPG", "c.jpeg"]  # fmt: skip


def test_docstring_examples():
    assert doctest.testmod(feat).failed == 0
