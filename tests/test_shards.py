"""WebDataset shards of LCUs: round trip, rank/worker splits, URLs, corrupt samples, resume."""

import io
import itertools
import json
import os
import runpy
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ace.data import shards as sh
from ace.data.manifest import LCUManifest, write_manifest
from ace.data.shards import ShardStream, sample_to_lcu, write_shards
from ace.data.toy import sample_stream
from ace.lcu import LCU, ConditionUnit

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- helpers


def numbered(n: int) -> list[LCU]:
    """LCUs named by their instruction ("lcu 7"), with and without inputs, masks, history."""
    out = []
    for i in range(n):
        im = Image.new("RGB", (16 + 8 * (i % 3), 16), (10 * i % 256, 0, 0))
        mask = Image.new("L", im.size, 255 * (i % 2))
        if i % 3 == 0:
            lcu = LCU(ConditionUnit(f"lcu {i}"), target=im, task="text_to_image")
        elif i % 3 == 1:
            lcu = LCU(ConditionUnit(f"lcu {i} {{image}}", [im], [mask]), target=im, task="edit")
        else:
            lcu = LCU(
                ConditionUnit(f"lcu {i} {{image}}", [im], [None]),
                history=[
                    ConditionUnit("before"),
                    ConditionUnit("then {image}", [im], task="inpainting"),
                ],
                target=im,
                target_mask=mask,
                task="multi_turn",
            )
        out.append(lcu)
    return out


def name(lcu: LCU) -> str:
    return lcu.current.instruction.split(" {")[0]


def assert_same_lcu(a: LCU, b: LCU) -> None:
    assert a.task == b.task and a.instructions() == b.instructions()
    assert [cu.task for cu in a.history] == [cu.task for cu in b.history]
    frames_a = [a.target, a.target_mask, *a.images, *a.masks]
    frames_b = [b.target, b.target_mask, *b.images, *b.masks]
    assert len(frames_a) == len(frames_b)
    for x, y in zip(frames_a, frames_b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.mode == y.mode and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """12 numbered LCUs in 6 shards of 2."""
    write_manifest(numbered(12), tmp_path / "ds", progress=False)
    write_shards(tmp_path / "ds", tmp_path / "shards", samples_per_shard=2, progress=False)
    return tmp_path / "shards"


def pattern(shard_dir: Path, n: int = 6) -> str:
    return f"{shard_dir}/shard-{{000000..{n - 1:06d}}}.tar"


def names(it) -> list[str]:
    return [name(lcu) for lcu in it]


def write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- writing


def test_round_trip_in_order_equals_the_manifest(tmp_path):
    lcus = [s.lcu for s in sample_stream(9, seed=0)] + numbered(3)
    write_manifest(lcus, tmp_path / "ds", progress=False)
    paths = write_shards(tmp_path / "ds", tmp_path / "out", samples_per_shard=5, progress=False)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    ds = LCUManifest(tmp_path / "ds")
    got = list(ShardStream([str(p) for p in paths]))
    assert len(got) == len(ds) == 12
    for i, lcu in enumerate(got):
        assert_same_lcu(ds[i], lcu)


def test_sample_layout(tmp_path):
    write_manifest(numbered(3), tmp_path / "ds", progress=False)
    lines = (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "meta": {"source": "hand"}})
    (tmp_path / "ds" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (path,) = write_shards(tmp_path / "ds", tmp_path / "out", progress=False)
    with tarfile.open(path) as tar:
        members = tar.getnames()
        record = json.loads(tar.extractfile("000000002.json").read())
    assert members[:2] == ["000000000.json", "000000000.target.png"]
    assert set(members) >= {
        "000000002.t1_i0.png",
        "000000002.t2_i0.png",
        "000000002.target_mask.png",
    }
    assert record == {
        "turns": [
            {"instruction": "before", "images": [], "masks": []},
            {
                "instruction": "then {image}",
                "images": ["t1_i0.png"],
                "masks": [None],
                "task": "inpainting",
            },
            {"instruction": "lcu 2 {image}", "images": ["t2_i0.png"], "masks": [None]},
        ],
        "target": "target.png",
        "target_mask": "target_mask.png",
        "task": "multi_turn",
        "meta": {"source": "hand"},
    }


def test_same_manifest_gives_byte_identical_shards(tmp_path):
    write_manifest(numbered(5), tmp_path / "ds", progress=False)
    a = write_shards(tmp_path / "ds", tmp_path / "a", samples_per_shard=2, progress=False)
    b = write_shards(tmp_path / "ds", tmp_path / "b", samples_per_shard=2, progress=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_existing_shards_need_overwrite_which_replaces_the_set(tmp_path, shard_dir):
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(tmp_path / "ds", shard_dir, progress=False)
    paths = write_shards(
        tmp_path / "ds", shard_dir, samples_per_shard=5, overwrite=True, progress=False
    )
    assert sorted(shard_dir.iterdir()) == paths and len(paths) == 3


def test_an_interrupt_after_the_commit_leaves_the_new_set_whole(tmp_path, shard_dir, monkeypatch):
    """The old shards were deleted inside the try: an interrupt at the second deletion
    removed the new set and brought back only the old shards not yet deleted."""
    real_unlink, calls = Path.unlink, []

    def unlink(self, *a, **k):
        if ".old-" in self.name:
            calls.append(self)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        write_shards(
            tmp_path / "ds", shard_dir, samples_per_shard=5, overwrite=True, progress=False
        )
    monkeypatch.undo()
    assert names(ShardStream(sorted(str(p) for p in shard_dir.glob("shard-*.tar")))) == [
        f"lcu {i}" for i in range(12)
    ]
    assert len(list(shard_dir.glob("shard-*.tar"))) == 3  # the new set of 5 a shard


def test_shard_urls_paths_and_unset_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("ACE_NO_SUCH_VAR", raising=False)
    with pytest.raises(ValueError, match=r"shard URL '\$\{ACE_NO_SUCH_VAR\}/x\.tar'"):
        ShardStream("${ACE_NO_SUCH_VAR}/x.tar")
    odd = tmp_path / "runs" / "{a,b}" / "x.tar"  # a Path is one file, braces and all
    assert ShardStream(odd).urls == [str(odd)]
    assert len(ShardStream(str(tmp_path / "s-{0..2}.tar")).urls) == 3


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    write_manifest(numbered(6), tmp_path / "ds", progress=False)
    real, calls = sh._shard_sample, []

    def flaky(ds, i):
        calls.append(i)
        if i == 4:
            raise KeyboardInterrupt
        return real(ds, i)

    monkeypatch.setattr(sh, "_shard_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path / "ds", tmp_path / "new" / "out", samples_per_shard=2, progress=False)
    assert calls == [0, 1, 2, 3, 4] and not (tmp_path / "new").exists()


def test_a_failed_rename_while_overwriting_puts_the_old_set_back(tmp_path, monkeypatch):
    write_manifest(numbered(6), tmp_path / "ds", progress=False)
    out = tmp_path / "out"
    old = write_shards(tmp_path / "ds", out, samples_per_shard=3, progress=False)  # 2 shards
    before = {p.name: p.read_bytes() for p in old}
    real, renames = os.replace, []

    def replace(src, dst):  # the second new shard's rename fails, once
        renames.append(dst)
        if str(dst).endswith("shard-000001.tar") and ".old-" not in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(sh.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        write_shards(tmp_path / "ds", out, samples_per_shard=2, progress=False, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole


def test_bad_record_is_an_error_naming_the_line(tmp_path):
    write_manifest(numbered(3), tmp_path / "ds", progress=False)
    (tmp_path / "ds" / "images" / "000001_target.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"line 2: target: unreadable image"):
        write_shards(tmp_path / "ds", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- streaming


def test_urls_brace_patterns_lists_and_pipes(shard_dir):
    everything = [f"lcu {i}" for i in range(12)]
    assert names(ShardStream(pattern(shard_dir))) == everything
    paths = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    assert names(ShardStream([Path(p) for p in paths])) == everything
    assert names(ShardStream([f"pipe:cat {p}" for p in paths])) == everything
    assert (
        names(ShardStream(f"pipe:cat {shard_dir}/shard-{{000000..000002}}.tar")) == everything[:6]
    )
    assert names(ShardStream(f"{paths[5]}::{paths[0]}")) == ["lcu 10", "lcu 11", "lcu 0", "lcu 1"]


def test_shuffling_is_deterministic_and_reshuffles_per_epoch(shard_dir):
    s = ShardStream(pattern(shard_dir), seed=3, shuffle_buffer=4)
    epoch0, epoch1 = names(s), names(s)  # each pass is the next epoch
    again = ShardStream(pattern(shard_dir), seed=3, shuffle_buffer=4)
    other = ShardStream(pattern(shard_dir), seed=4, shuffle_buffer=4)
    assert names(again) == epoch0 and names(other) != epoch0 and epoch1 != epoch0
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"lcu {i}" for i in range(12))
    again.set_epoch(0)
    assert names(again) == epoch0
    endless = ShardStream(pattern(shard_dir), seed=3, shuffle_buffer=4, repeat=True)
    assert names(itertools.islice(endless, 24)) == epoch0 + epoch1


@pytest.mark.parametrize("shuffle_buffer", [0, 5])
def test_ranks_read_disjoint_shards_that_cover_everything(shard_dir, shuffle_buffer):
    ranks = [
        names(ShardStream(pattern(shard_dir), 0, shuffle_buffer, rank=r, world_size=2))
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 6 and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(f"lcu {i}" for i in range(12))
    with pytest.raises(ValueError, match="6 shard"):
        list(ShardStream(pattern(shard_dir), rank=0, world_size=7))


def test_dataloader_workers_split_shards(shard_dir):
    everything = sorted(f"lcu {i}" for i in range(12))
    s = ShardStream(pattern(shard_dir), rank=1, world_size=2)
    plain = names(DataLoader(s, batch_size=None, num_workers=2))
    assert sorted(plain) == sorted(names(s)) and len(plain) == 6  # rank 1's half, once
    s = ShardStream(pattern(shard_dir), seed=1, shuffle_buffer=3)
    tracked = names(s.loader(num_workers=2))
    assert sorted(tracked) == everything
    assert s.worker_shards(0, 0, 2) != s.worker_shards(0, 1, 2)
    assert names(ShardStream(pattern(shard_dir, 1)).loader(num_workers=2)) == ["lcu 0", "lcu 1"]


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path, shard_dir):
    im, good = Image.new("RGB", (16, 16)), numbered(1)
    record = {
        "turns": [{"instruction": "x {image}", "images": ["a.png"]}],
        "target": "t.png",
        "task": "",
    }
    ok = {"json": json.dumps(record).encode(), "a.png": png(im), "t.png": png(im)}
    write_tar(
        tmp_path / "bad.tar",
        [
            {"__key__": "000000000", **ok},
            {"__key__": "000000001", **ok, "a.png": b"\x89PNG broken"},
            {"__key__": "000000002", **ok, "json": b"{not json"},
            {"__key__": "000000003", **ok, "json": json.dumps({**record, "task": 3}).encode()},
            {"__key__": "000000004", **{k: v for k, v in ok.items() if k != "t.png"}},
            {"__key__": "000000005", **ok, "json": ok["json"].replace(b"{image}", b"{image1}")},
            {"__key__": "000000006", **ok},
        ],
    )
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes((shard_dir / "shard-000000.tar").read_bytes()[:3000])
    missing = [str(tmp_path / "missing.tar"), f"pipe:cat {tmp_path / 'missing.tar'}"]
    urls = [str(tmp_path / "bad.tar"), *missing, str(truncated)]
    s = ShardStream(urls)
    with pytest.warns(UserWarning, match="ShardStream: skipping") as caught:
        got = list(s)
    assert len(got) == 2 + 1 and all(isinstance(x, LCU) for x in got)
    assert_same_lcu(got[2], good[0])  # the truncated shard's first sample is whole
    # 5 corrupt samples, 2 missing shards, the truncated shard, the sample cut by truncation
    assert s.skipped == 5 + 2 + 1 + 1 and len(caught) >= 9
    with pytest.raises(ValueError, match=r"unreadable image 'a\.png'"):
        sample_to_lcu({"__key__": "k", **ok, "a.png": b"junk"})


def test_a_shard_cut_at_a_header_or_with_a_bad_header_is_warned_and_counted(tmp_path):
    """Python's tarfile ends a stream quietly at a missing or corrupt header past the
    first: a shard cut at a 512-byte block, or with a bad checksum, lost its rest with no
    warning or count (the test above cuts mid-block). And a half-read sample must not merge
    with the next shard's first one when their keys match."""
    lcus = numbered(16)
    write_manifest(lcus[:8], tmp_path / "a", progress=False)
    write_manifest(lcus[8:], tmp_path / "b", progress=False)  # the same keys, other LCUs
    (a,) = write_shards(tmp_path / "a", tmp_path / "sa", samples_per_shard=8, progress=False)
    (b,) = write_shards(tmp_path / "b", tmp_path / "sb", samples_per_shard=8, progress=False)
    with tarfile.open(a) as t:
        members = t.getmembers()
    first = [next(m for m in members if m.name.startswith(f"{k:09d}.")) for k in range(8)]
    header = first[4].offset  # the header of sample 4's first file
    raw = a.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:header])  # on a block boundary
    flipped = bytearray(raw)
    flipped[header + 148] ^= 0x11  # the header's checksum field
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(flipped))
    for damaged in (cut, bad):
        s = ShardStream([str(damaged)])
        with pytest.warns(UserWarning, match="corrupt or truncated tar"):
            got = names(s)
        assert got == [f"lcu {i}" for i in range(4)] and s.skipped == 1, damaged
    # cut inside sample 0's last file, then a shard whose first key is the same
    inside = tmp_path / "inside.tar"
    last = members[members.index(first[1]) - 1]  # sample 0's last file
    inside.write_bytes(raw[: last.offset + 512 + 10])
    s = ShardStream([str(inside), str(b)])
    with pytest.warns(UserWarning, match="ShardStream: skipping"):
        got = names(s)
    assert got == [f"lcu {i}" for i in range(8, 16)]  # b whole, no mixed sample


def test_a_saved_position_needs_the_same_order_of_samples(shard_dir, tmp_path):
    """A position saved with a shuffle buffer of 4, loaded into a stream without one, was
    accepted: 3 samples of the epoch came twice and 3 never."""
    s = ShardStream(pattern(shard_dir), seed=1, shuffle_buffer=4)
    it = iter(s)
    for _ in range(5):
        next(it)
    state = s.state_dict()
    for other, named in [
        (ShardStream(pattern(shard_dir), seed=1), "shuffle_buffer=4 there, 0 now"),
        (ShardStream(pattern(shard_dir), seed=1, shuffle_buffer=4, repeat=True), "repeat"),
        (ShardStream(pattern(shard_dir, 5), seed=1, shuffle_buffer=4), "shard_names"),
    ]:
        with pytest.raises(ValueError, match=named):
            other.load_state_dict(state)
    moved = tmp_path / "moved"
    shard_dir.rename(moved)  # the same shards elsewhere: resumes where it stopped
    again = ShardStream(pattern(moved), seed=1, shuffle_buffer=4)
    again.load_state_dict(state)
    whole = names(ShardStream(pattern(moved), seed=1, shuffle_buffer=4))
    assert names(again) == whole[5:]


def test_sample_to_lcu_reads_what_the_manifest_reads(tmp_path):
    lcus = [s.lcu for s in sample_stream(6, seed=1)]
    write_manifest(lcus, tmp_path / "ds", progress=False)
    (path,) = write_shards(tmp_path / "ds", tmp_path / "out", progress=False)
    samples = list(wds.tarfile_samples(iter([{"url": str(path)}])))
    assert len(samples) == 6
    for i, sample in enumerate(samples):
        assert_same_lcu(LCUManifest(tmp_path / "ds")[i], sample_to_lcu(sample))


# ---------------------------------------------------------------------------------- resume


def resumed(make, k: int, workers: int, rest: int | None = None) -> tuple[list[str], list[str]]:
    """(first k names, the rest (or the next ``rest``) after saving and loading the state
    into a fresh stream)."""
    s = make()
    it = iter(s.loader(workers))
    first = [name(next(it)) for _ in range(k)]
    state = json.loads(json.dumps(s.state_dict()))  # it survives JSON
    del it
    fresh = make()
    fresh.load_state_dict(state)
    return first, names(itertools.islice(fresh.loader(workers), rest))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_rest(shard_dir, workers):
    def make():
        return ShardStream(pattern(shard_dir), seed=2, shuffle_buffer=3)

    full = names(make().loader(workers))
    for k in (0, 1, 5, 11, 12):
        first, rest = resumed(make, k, workers)
        assert first + rest == full, k


def test_resume_of_an_endless_stream_across_epochs(shard_dir):
    def make():
        return ShardStream(pattern(shard_dir), seed=2, shuffle_buffer=3, repeat=True)

    full = names(itertools.islice(make().loader(2), 40))
    s = make()
    it = iter(s.loader(2))
    first = [name(next(it)) for _ in range(17)]
    state = s.state_dict()
    del it
    assert [e for e, _ in state["positions"]] == [1, 1]  # both workers in epoch 1
    fresh = make()
    fresh.load_state_dict(state)
    assert first + names(itertools.islice(fresh.loader(2), 23)) == full


def test_an_endless_stream_outlives_an_empty_shard(shard_dir):
    """Four workers, one shard each per epoch, one shard empty: the epoch that deals it to a
    worker used to drop that worker for good, until the endless stream ended. Now the
    worker goes on next epoch, and a resume continues exactly."""

    empty = shard_dir / "shard-000099.tar"
    tarfile.open(empty, "w").close()  # a shard with no samples
    urls = [str(shard_dir / f"shard-{k:06d}.tar") for k in range(3)] + [str(empty)]

    def make():
        return ShardStream(urls, seed=0, shuffle_buffer=2, repeat=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "read no samples", and the worker count
        full = names(itertools.islice(make().loader(4), 48))
        first, rest = resumed(make, 19, 4, rest=29)
    assert len(full) == 48 and sorted(set(full)) == sorted(names(numbered(6)))
    assert first + rest == full


def test_an_endless_stream_of_unreadable_shards_ends(tmp_path):

    for k in range(2):
        tarfile.open(tmp_path / f"shard-{k:06d}.tar", "w").close()
    stream = ShardStream(f"{tmp_path}/shard-{{000000..000001}}.tar", repeat=True)
    with pytest.warns(UserWarning, match="read no samples"):
        assert list(stream) == []  # after as many empty epochs as shards, not forever


def test_an_endless_stream_of_broken_samples_ends(tmp_path):
    """Samples that are read but never decode (no record) counted as read, so the endless
    stream never saw an empty epoch and training hung without an error."""
    write_tar(tmp_path / "shard-000000.tar", [{"__key__": f"{k:09d}", "txt": b"x"} for k in range(3)])  # fmt: skip
    stream = ShardStream(str(tmp_path / "shard-000000.tar"), repeat=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = list(itertools.islice(stream, 100))  # it ends: no LCU, and not 100 of them
    assert got == [] and stream.skipped == 3


def test_a_stream_of_samples_too_small_to_train_on_stops_the_run(monkeypatch):
    """The trainer's filter of a stream (images too small for a patch) skipped forever."""
    import ace.train.data as data

    small = Image.new("RGB", (8, 8))  # resizes to no 16 px square
    tiny = LCU(ConditionUnit("x {image}", [small]), target=small)
    monkeypatch.setattr(data, "UNTRAINABLE_IN_A_ROW", 5)
    source = data._Trainable(itertools.repeat(tiny), max_seq_len=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="5 streamed samples in a row could not be trained on"):
            next(iter(source))


def test_a_resume_does_not_count_a_replayed_shard_error_again(shard_dir):
    urls = [str(shard_dir / "missing.tar")] + [str(shard_dir / f"shard-{k:06d}.tar") for k in range(3)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = ShardStream(urls)
        assert len(list(straight)) == 6 and straight.skipped == 1
        s = ShardStream(urls)
        it = iter(s)
        first = [next(it) for _ in range(3)]
        state = s.state_dict()
        del it
        fresh = ShardStream(urls)
        fresh.load_state_dict(state)
        rest = list(fresh)
    assert len(first) + len(rest) == 6 and fresh.skipped == 1  # not 2


def test_resume_needs_the_same_seed_world_and_workers(shard_dir):
    s = ShardStream(pattern(shard_dir), seed=2)
    it = iter(s.loader(2))
    next(it)
    state = s.state_dict()
    del it
    with pytest.raises(ValueError, match="does not fit"):
        ShardStream(pattern(shard_dir), seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        ShardStream(pattern(shard_dir), seed=2, rank=1, world_size=2).load_state_dict(state)
    fresh = ShardStream(pattern(shard_dir), seed=2)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="2 worker"):
        list(fresh)


# ---------------------------------------------------------------------------------- script


def make_shards(argv) -> int:
    return runpy.run_path(str(ROOT / "scripts" / "make_shards.py"))["main"]([*map(str, argv)])


def test_make_shards_script(tmp_path, capsys):
    write_manifest(numbered(5), tmp_path / "ds", progress=False)
    out = tmp_path / "out"
    assert (
        make_shards(
            ["--manifest", tmp_path / "ds", "--out", out, "--samples-per-shard", 2, "--quiet"]
        )
        == 0
    )
    assert "wrote 3 shard(s)" in capsys.readouterr().out
    assert names(ShardStream(pattern(out, 3))) == [f"lcu {i}" for i in range(5)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--manifest", "nowhere"], "no LCU manifest"),
        (["--manifest", "ds", "--samples-per-shard", "0"], "samples_per_shard"),
        (["--manifest", "ds", "--out", "taken"], "already holds shards"),
    ],
)
def test_make_shards_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    write_manifest(numbered(2), tmp_path / "ds", progress=False)
    write_shards(tmp_path / "ds", tmp_path / "taken", progress=False)
    args = [str(tmp_path / a) if a in ("nowhere", "ds", "taken") else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    assert make_shards([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_shards.py: error:") and message in err
    assert not (tmp_path / "new").exists()


def test_rank_and_world_size_default_to_torch_distributed(shard_dir, monkeypatch):
    monkeypatch.setattr(sh.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sh.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(sh.dist, "get_world_size", lambda: 3)
    s = ShardStream(pattern(shard_dir))
    assert names(s) == ["lcu 2", "lcu 3", "lcu 8", "lcu 9"]  # shards 1 and 4 of 6
    assert s.state_dict()["rank"] == 1 and s.state_dict()["world_size"] == 3
