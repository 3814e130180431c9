"""The LCU dataset format: write/read round trip, determinism, atomic writes, errors naming the line."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ace.data import manifest as mf
from ace.data.manifest import LCUManifest, read_record, write_lcu, write_manifest
from ace.lcu import LCU, ConditionUnit
from tests._scripts import run_script

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- helpers


def solid(colour, size=(24, 16), box=None, box_colour=(255, 255, 255)):
    """An RGB image of one colour, with an optional rectangle of another."""
    im = Image.new("RGB", size, colour)
    if box:
        ImageDraw.Draw(im).rectangle(box, fill=box_colour)
    return im


def mask(box, size=(24, 16)):
    """An "L" mask, white inside ``box``."""
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return m


def noise(size=(24, 16), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def hand_lcus() -> list[LCU]:
    """Text-to-image, a masked edit, two references, and a 3-turn chain with history."""
    red, blue = solid((200, 30, 30)), solid((20, 40, 220), box=(2, 2, 9, 9))
    return [
        LCU(ConditionUnit("a red square"), target=red, task="text_to_image"),
        LCU(
            ConditionUnit("fill the box in {image} with blue", [red], [mask((2, 2, 9, 9))]),
            target=blue,
            target_mask=mask((2, 2, 9, 9)),
            task="inpainting",
        ),
        LCU(
            ConditionUnit("put {image1} into {image}", [noise(seed=1), solid((0, 255, 0), (8, 8))]),
            target=noise(seed=2),
            task="reference",
        ),
        LCU(
            current=ConditionUnit("now make {image} green", [blue], [None]),
            history=[
                ConditionUnit("a red square"),
                ConditionUnit(
                    "put a blue box in {image}", [red], [mask((2, 2, 9, 9))], "inpainting"
                ),
            ],
            target=solid((0, 200, 0), box=(2, 2, 9, 9)),
            target_mask=mask((0, 0, 23, 15)),
            task="multi_turn",
        ),
    ]


def pixels(x):
    return None if x is None else np.asarray(x)


def assert_same_lcu(a: LCU, b: LCU) -> None:
    """Same instructions, task, and pixel arrays of every image, mask and target."""
    assert a.task == b.task
    assert [cu.instruction for cu in a.turns] == [cu.instruction for cu in b.turns]
    assert [cu.task for cu in a.history] == [cu.task for cu in b.history]  # a history turn's tag
    assert [len(cu.images) for cu in a.turns] == [len(cu.images) for cu in b.turns]
    for x, y in zip([*a.images, *a.masks], [*b.images, *b.masks]):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x.mode == y.mode and np.array_equal(pixels(x), pixels(y))
    assert b.target.mode == "RGB" and np.array_equal(pixels(a.target), pixels(b.target))
    assert (a.target_mask is None) == (b.target_mask is None)
    if a.target_mask is not None:
        assert b.target_mask.mode == "L"
        assert np.array_equal(pixels(a.target_mask), pixels(b.target_mask))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A written dataset directory of the hand-built LCUs."""
    write_manifest(hand_lcus(), tmp_path / "ds", progress=False)
    return tmp_path / "ds"


def set_line(root: Path, line: int, record) -> None:
    """Replace the manifest's line ``line`` (1-based) with ``record`` (a dict or raw text)."""
    lines = (root / "manifest.jsonl").read_text().splitlines()
    lines[line - 1] = record if isinstance(record, str) else json.dumps(record)
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------- writing and reading


def test_round_trip_gives_the_same_lcus(dataset):
    ds = LCUManifest(dataset)
    originals = hand_lcus()
    assert len(ds) == len(originals) and ds.lines == [1, 2, 3, 4]
    assert ds.tasks == {"text_to_image": 1, "inpainting": 1, "reference": 1, "multi_turn": 1}
    assert ds.root == dataset and ds.validate() == []
    for i, lcu in enumerate(originals):
        assert_same_lcu(lcu, ds[i])
    assert LCUManifest(dataset / "manifest.jsonl").records == ds.records
    # a manifest an editor saved with a byte-order mark reads the same
    text = (dataset / "manifest.jsonl").read_text(encoding="utf-8")
    (dataset / "manifest.jsonl").write_text("\ufeff" + text, encoding="utf-8")
    assert LCUManifest(dataset).records == ds.records


def test_record_layout_and_file_names(tmp_path):
    record = write_lcu(hand_lcus()[3], tmp_path, "chain")
    assert record == {
        "turns": [
            {"instruction": "a red square", "images": [], "masks": []},
            {
                "instruction": "put a blue box in {image}",
                "images": ["images/chain_t1_i0.png"],
                "masks": ["images/chain_t1_m0.png"],
                "task": "inpainting",  # written only when a turn has one
            },
            {"instruction": "now make {image} green", "images": ["images/chain_t2_i0.png"], "masks": [None]},
        ],
        "target": "images/chain_target.png",
        "target_mask": "images/chain_target_mask.png",
        "task": "multi_turn",
    }  # fmt: skip
    assert sorted(files(tmp_path)) == sorted(
        [*record["turns"][1]["images"], *record["turns"][1]["masks"], *record["turns"][2]["images"],
         record["target"], record["target_mask"]]
    )  # fmt: skip
    assert Image.open(tmp_path / record["target_mask"]).mode == "L"
    assert Image.open(tmp_path / record["target"]).mode == "RGB"
    assert_same_lcu(hand_lcus()[3], read_record(record, tmp_path, line=1))
    with pytest.raises(ValueError, match="name"):
        write_lcu(hand_lcus()[0], tmp_path, "../escape")
    with pytest.raises(ValueError, match="needs a target"):
        write_lcu(LCU(ConditionUnit("a cat")), tmp_path, "x")


def test_tensor_images_and_masks_are_stored_as_8_bit(tmp_path):
    image = torch.rand(3, 8, 12)
    lcu = LCU(ConditionUnit("edit {image}", [image], [torch.rand(1, 8, 12) > 0.5]), target=image)
    back = read_record(write_lcu(lcu, tmp_path, "t"), tmp_path, line=1)
    expected = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    assert np.array_equal(np.asarray(back.target), expected)
    assert np.array_equal(np.asarray(back.masks[0]) == 255, lcu.masks[0][0].numpy())


def test_integer_0_1_masks_are_stored_as_0_255(tmp_path):
    """An int64 0/1 mask (1 inside, as ConditionUnit reads it) was stored as 0/1 and read
    back as empty, which means the whole image."""
    image = torch.rand(3, 32, 32)
    inside = torch.zeros(1, 32, 32, dtype=torch.int64)
    inside[:, 8:24, 8:24] = 1
    lcu = LCU(ConditionUnit("edit {image}", [image], [inside]), target=image, target_mask=inside)
    back = read_record(write_lcu(lcu, tmp_path, "m"), tmp_path, line=1)
    for mask in (back.masks[0], back.target_mask):
        assert int((np.asarray(mask) > 128).sum()) == 16 * 16
    wide = torch.full((1, 4, 4), 200, dtype=torch.int64)  # 0-255 stays 0-255
    back = read_record(write_lcu(LCU(ConditionUnit("edit {image}", [image[:, :4, :4]], [wide]),
                                     target=image), tmp_path, "w"), tmp_path, line=1)  # fmt: skip
    assert np.asarray(back.masks[0]).max() == 200


def test_a_path_that_cannot_be_checked_is_a_bad_sample(tmp_path):
    """A name too long for the file system raised OSError, which training does not skip."""
    root = write_manifest(hand_lcus()[:1], tmp_path / "d", progress=False).parent
    record = json.loads((root / "manifest.jsonl").read_text().splitlines()[0])
    record["target"] = "x" * 300 + ".png"
    with pytest.raises(ValueError, match=r"line 1: target: cannot read 'x+\.png'"):
        read_record(record, root, line=1)


def test_a_symlinked_root_is_written_where_it_points(tmp_path):
    """The symlink itself was moved aside and replaced by a local directory, and a hidden
    link left behind; the data never reached the link's target."""
    target = tmp_path / "big" / "train"
    target.mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    link = tmp_path / "proj" / "train"
    link.symlink_to(target, target_is_directory=True)
    write_manifest(hand_lcus()[:2], link, progress=False, overwrite=True)
    assert link.is_symlink() and (target / "manifest.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["train"]
    assert len(LCUManifest(link)) == 2


def test_same_lcus_write_byte_identical_files(tmp_path):
    a = write_manifest(hand_lcus(), tmp_path / "a", progress=False).parent
    b = write_manifest(hand_lcus(), tmp_path / "b", progress=False).parent
    fa, fb = files(a), files(b)
    assert len(fa) == 1 + 1 + 4 + 3 + 5  # manifest + the PNGs of each LCU
    assert fa == fb


def test_existing_output_needs_overwrite(tmp_path, dataset):
    with pytest.raises(ValueError, match="not empty"):
        write_manifest(hand_lcus()[:1], dataset, progress=False)
    assert len(LCUManifest(dataset)) == 4  # untouched
    write_manifest(hand_lcus()[:1], dataset, progress=False, overwrite=True)
    assert len(LCUManifest(dataset)) == 1 and len(files(dataset)) == 2  # old files gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no leftovers
    (tmp_path / "empty").mkdir()
    write_manifest(hand_lcus()[:1], tmp_path / "empty", progress=False)  # empty dir: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_manifest(hand_lcus(), tmp_path / "file", progress=False)


def _failing_save(monkeypatch, after: int, exc: BaseException):
    """Make the ``after``-th PNG write (0-based) raise ``exc``."""
    calls = []
    save = Image.Image.save

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise exc
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky)


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, exc):
    _failing_save(monkeypatch, after=5, exc=exc)
    root = tmp_path / "new" / "deeper" / "ds"  # parents made by the call go too
    with pytest.raises(type(exc)):
        write_manifest(hand_lcus(), root, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_dataset(tmp_path, dataset, monkeypatch):
    before = files(dataset)

    def stream():
        yield from hand_lcus()[:2]
        raise RuntimeError("generator broke")

    with pytest.raises(RuntimeError, match="generator broke"):
        write_manifest(stream(), dataset, progress=False, overwrite=True)
    assert files(dataset) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ---------------------------------------------------------------------------------- bad input


def _corrupt_png(root: Path) -> None:
    path = root / LCUManifest(root).records[2]["target"]
    path.write_bytes(path.read_bytes()[:40])  # truncated after the header


def _wrong_reference(root: Path) -> None:
    line = LCUManifest(root).lines[2]
    record = LCUManifest(root).records[2]
    record["turns"][0] = {"instruction": "{image2}", "images": record["turns"][0]["images"][:1]}
    set_line(root, line, record)


def _small_target_mask(root: Path) -> None:
    ds = LCUManifest(root)
    small = ds.records[2]["turns"][0]["images"][1]  # an 8 x 8 image, read as a mask
    set_line(root, ds.lines[2], {**ds.records[2], "target_mask": small})


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda r: set_line(r, 3, '{"turns": [}'), "line 3: invalid JSON"),
        (lambda r: set_line(r, 3, "[1, 2]"), "line 3: record: expected a JSON object"),
        (lambda r: set_line(r, 3, {"target": "x.png", "task": "t"}), "line 3: record: missing field 'turns'"),
        (lambda r: set_line(r, 3, {"turns": [], "target": "x.png", "task": "t"}), "line 3: turns: expected a non-empty"),
        (lambda r: set_line(r, 3, {"turns": [{"instruction": 3, "images": []}], "target": "x.png", "task": "t"}), "line 3: turns\\[0\\].instruction: expected a string, got 3"),
        (lambda r: set_line(r, 3, {"turns": [{"instruction": "a", "images": ["a.png"], "masks": []}], "target": "x.png", "task": "t"}), "line 3: turns\\[0\\].masks: 0 masks for 1 images"),
        (lambda r: set_line(r, 3, {"turns": [{"instruction": "a", "images": []}], "target": "x.png", "task": "t", "targt_mask": None}), "line 3: record: unknown field\\(s\\) \\['targt_mask'\\]"),
        (lambda r: set_line(r, 3, {"turns": [{"instruction": "a", "images": []}], "target": None, "task": "t"}), "line 3: target: expected a path string, got null"),
        (lambda r: (r / "manifest.jsonl").write_bytes(b'{"turns": \xff}\n'), "not UTF-8 text"),
    ],
)  # fmt: skip
def test_malformed_lines_fail_when_the_manifest_is_opened(dataset, break_it, message):
    break_it(dataset)
    with pytest.raises(ValueError, match=message) as info:
        LCUManifest(dataset)
    assert "manifest.jsonl" in str(info.value)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda r: (r / LCUManifest(r).records[2]["turns"][0]["images"][1]).unlink(), "line 4: turns\\[0\\].images\\[1\\]: missing file 'images/000002_t0_i1.png'"),
        (_corrupt_png, "line 4: target: unreadable image 'images/000002_target.png'"),
        (_wrong_reference, "line 4: turns\\[0\\]: instruction references \\{image2\\} but the condition unit has 1 image"),
        (_small_target_mask, "line 4: target_mask: size \\(H, W\\) = \\(8, 8\\) differs"),
    ],
)  # fmt: skip
def test_bad_files_fail_when_the_lcu_is_loaded(dataset, break_it, message):
    manifest = dataset / "manifest.jsonl"
    manifest.write_text("\n" + manifest.read_text())  # empty line 1: skipped, still counted
    ds = LCUManifest(dataset)
    assert ds.lines == [2, 3, 4, 5]
    break_it(dataset)
    ds = LCUManifest(dataset)  # the fields are fine: opening works
    with pytest.raises(ValueError, match=message):
        ds[2]
    assert len(ds.validate()) == 1 and "line 4: " in ds.validate()[0]
    with pytest.raises(ValueError, match=message):
        read_record(ds.records[2], ds.root, line=4)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LCU manifest"):
        LCUManifest(tmp_path)


# ---------------------------------------------------------------------------------- python -m


def run_validator(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ace.data.manifest", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_validator_cli(dataset, tmp_path, capsys):
    good = run_validator(dataset)
    assert good.returncode == 0, good.stderr
    assert "4 LCUs, all valid" in good.stdout
    assert any(line.split() == ["inpainting", "1"] for line in good.stdout.splitlines())

    _corrupt_png(dataset)
    bad = run_validator(dataset / "manifest.jsonl")
    assert bad.returncode == 1 and bad.stdout == ""
    assert "line 3: target: unreadable image" in bad.stderr and "INVALID, 1 error(s)" in bad.stderr

    # the rest in-process: the same main(), without paying for another torch import
    set_line(dataset, 2, "not json")
    assert mf.main([str(dataset)]) == 1 and "line 2: invalid JSON" in capsys.readouterr().err
    assert mf.main([str(tmp_path / "nowhere")]) == 1
    assert "no LCU manifest" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.jsonl").write_text("\n")
    assert mf.main([str(tmp_path / "empty")]) == 1 and "no records" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the toy world


def make_toy_data(argv, capsys):
    """Run scripts/make_toy_data.py as __main__ in-process; return (exit code, stdout, stderr)."""
    return run_script(ROOT / "scripts" / "make_toy_data.py", argv, capsys)


def test_make_toy_data_writes_what_the_generator_makes(tmp_path, capsys):
    from ace.data import toy

    code, out, err = make_toy_data(["--out", tmp_path / "a", "--n", 12, "--seed", 3], capsys)
    assert code == 0, err
    assert "wrote 12 LCUs" in out and "12/12" in err  # the progress bar
    ds = LCUManifest(tmp_path / "a")
    assert ds.validate() == [] and len(ds) == 12 and set(ds.tasks) <= set(toy.TASKS)
    made = [sample.lcu for sample in toy.sample_stream(12, 3)]
    assert ds.tasks == Counter(lcu.task for lcu in made)
    for i, lcu in enumerate(made):
        assert_same_lcu(lcu, ds[i])

    argv = ["--out", tmp_path / "b", "--n", 12, "--seed", 3, "--quiet"]
    assert make_toy_data(argv, capsys)[0] == 0
    assert files(tmp_path / "a") == files(tmp_path / "b")  # same seed: byte-identical
    argv = ["--out", tmp_path / "b", "--n", 12, "--seed", 3, "--split", "eval", "--quiet"]
    assert make_toy_data(argv, capsys)[0] == 2  # exists: needs --overwrite
    assert make_toy_data([*argv, "--overwrite"], capsys)[0] == 0
    assert files(tmp_path / "a") != files(tmp_path / "b")  # eval seeds differ from train's


def test_make_toy_data_task_subset(tmp_path, capsys):
    argv = ["--out", tmp_path / "s", "--n", 6, "--seed", 0, "--tasks", "recolor,remove", "grayscale", "--size", 32, "--quiet"]  # fmt: skip
    assert make_toy_data(argv, capsys)[0] == 0
    ds = LCUManifest(tmp_path / "s")
    assert set(ds.tasks) <= {"recolor", "remove", "grayscale"} and ds[0].target.size == (32, 32)


def test_every_toy_task_round_trips(tmp_path):
    from ace.data import toy

    made = [toy.make_sample(t, np.random.default_rng(i), 32).lcu for i, t in enumerate(toy.TASKS)]
    ds = LCUManifest(write_manifest(made, tmp_path / "all", progress=False))
    assert ds.validate() == [] and list(ds.tasks) == list(toy.TASKS)
    for i, lcu in enumerate(made):
        assert_same_lcu(lcu, ds[i])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "recolor,teleport"], "unknown task(s) ['teleport']; known: text_to_image, "),
        (["--n", 0], "--n must be at least 1, got 0"),
        (["--size", 40], "impossible image size 40"),
        (["--tasks", ","], "--tasks names no task"),
    ],
)
def test_make_toy_data_bad_input_writes_nothing(tmp_path, capsys, extra, message):
    argv = ["--out", tmp_path / "new" / "toy", "--n", 12, "--seed", 0, *extra]  # later --n wins
    code, out, err = make_toy_data(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("make_toy_data.py: error: ") and err.count("\n") == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []
