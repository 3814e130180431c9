"""The embedding cache (ace.train.cache): the same batches as the encoders, fewer encoder calls."""

import json
import os

import pytest
import torch

from ace.conditioning import ConditionTokenizer
from ace.data.manifest import LCUManifest, write_manifest
from ace.data.toy import sample_stream
from ace.testing import tiny_text_encoder, tiny_transformer, tiny_vae
from ace.train.batch import encode_batch
from ace.train.cache import (
    EmbeddingCache,
    EncodedLCU,
    build_cache,
    cache_fingerprint,
    shard_path,
)

MAX_SEQ_LEN = 1024


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer, text_encoder = tiny_text_encoder()
    return ConditionTokenizer(tokenizer, text_encoder, tiny_vae()), tiny_transformer()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "data"
    write_manifest((s.lcu for s in sample_stream(10, seed=3, size=32)), root, progress=False)
    return LCUManifest(root)


@pytest.fixture(scope="module")
def cache(manifest, parts, tmp_path_factory):
    conditioner, _ = parts
    root = tmp_path_factory.mktemp("cache") / "emb"
    return build_cache(manifest, conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)


def batch(items, parts, seed, dropout=0.5):
    conditioner, model = parts
    g = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    return encode_batch(items, conditioner, model, MAX_SEQ_LEN, dropout, g, cpu, torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_batches_equal_the_encoders(manifest, cache, parts, seed):
    """Same generator -> same dropout draws and same posterior noise, so the same batch."""
    idx = [7, 0, 3, 9, 4]
    live = batch([manifest[i] for i in idx], parts, seed)
    cached = batch([cache[i] for i in idx], parts, seed)
    assert all(isinstance(cache[i], EncodedLCU) for i in idx)
    assert live.packed.frame_sizes == cached.packed.frame_sizes
    assert live.packed.text_lengths == cached.packed.text_lengths  # the same texts were dropped
    for name in ("tokens", "text", "x0", "target_mask"):
        torch.testing.assert_close(
            getattr(cached, name), getattr(live, name), rtol=1e-5, atol=1e-5, msg=name
        )


def test_dropout_trains_the_texts_guidance_gives(parts, tmp_path):
    """A dropped LCU reads what the sampler's unconditional half feeds: the empty prompt on
    the target and the last frame, every other frame its own turn's instruction. Frames
    [target, history image, current image 1, current image 2] read, by hand,
    ["", history, current, ""]; with no current image [target, history image]: ["", ""]."""
    from PIL import Image

    from ace.lcu import LCU, ConditionUnit

    conditioner, _ = parts
    empty = conditioner.encode_text([""])[0].shape[0]

    def im(c):
        return Image.new("RGB", (32, 32), (c, 0, 0))

    old = [ConditionUnit("make {image} very red", [im(3)])]
    two = LCU(ConditionUnit("put {image1} beside {image}", [im(1), im(2)]), old, target=im(4))
    none = LCU(ConditionUnit("now blue"), old, target=im(4))
    write_manifest([two, none], tmp_path / "data", progress=False)
    data = LCUManifest(tmp_path / "data")
    built = build_cache(data, conditioner, tmp_path / "emb", MAX_SEQ_LEN, progress=False)
    kept = batch([data[0], data[1]], parts, seed=0, dropout=0.0).packed.text_lengths
    (cur, hist, cur1, cur2), (now, hist2) = kept
    assert cur == cur1 == cur2 and hist == hist2 and len({cur, hist, now, empty}) == 4
    for items in ([data[0], data[1]], [built[0], built[1]]):
        got = batch(items, parts, seed=0, dropout=1.0).packed.text_lengths
        assert got == [[empty, hist, cur, empty], [empty, empty]], got


def test_cache_layout_and_every_sample(cache, manifest):
    info = json.loads((cache.root / "cache.json").read_text())
    assert info["num_shards"] == 3 and len(cache) == len(manifest) == 10
    assert sorted(p.name for p in cache.root.iterdir()) == [
        ".lock",  # the build's (one at a time), left as train.output_dir's is
        "cache.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    for i in range(len(cache)):
        item, lcu = cache[i], manifest[i]
        assert len(item.texts) == len(lcu.instructions())
        assert item.frame_turns == lcu.frame_turns()
        assert len(item.means) == len(item.stds) == len(item.masks) == 1 + len(lcu.images)
        assert item.means[0].shape == (4, 4, 4)  # tiny VAE: 32 px -> 4 x 4, 4 channels
    with pytest.raises(IndexError):
        cache[10]


def test_reopening_checks_the_fingerprint(cache, manifest, parts):
    conditioner, _ = parts
    again = build_cache(manifest, conditioner, cache.root, MAX_SEQ_LEN, shard_size=4)
    assert again.info == cache.info  # an existing cache is opened, not rebuilt
    other_vae = tiny_vae()  # other random weights
    with torch.no_grad():
        for p in other_vae.parameters():
            p.add_(0.01)
    other = ConditionTokenizer(conditioner.tokenizer, conditioner.text_encoder, other_vae)
    with pytest.raises(ValueError, match="different vae"):
        build_cache(manifest, other, cache.root, MAX_SEQ_LEN, shard_size=4)
    with pytest.raises(ValueError, match="different max_seq_len"):
        build_cache(manifest, conditioner, cache.root, 256, shard_size=4)
    with pytest.raises(ValueError, match="not a built embedding cache"):
        EmbeddingCache(cache.root / "nowhere")


@pytest.mark.parametrize(
    "text",
    ["{}", '{"fingerprint": {"num_samples": 3}', '{"fingerprint": 5, "shard_size": 4}', "\udcff"],
)
def test_an_unreadable_cache_json_is_named(tmp_path, text):
    """A truncated, foreign or binary cache.json: one message naming it, not a KeyError."""
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "cache.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"emb: cache\.json is unreadable .* delete the directory"):
        EmbeddingCache(tmp_path / "emb")


def test_a_cache_path_that_is_a_file_is_refused(manifest, parts, tmp_path):
    (tmp_path / "emb").write_text("")
    with pytest.raises(ValueError, match=r"emb is a file, not a directory"):
        build_cache(manifest, parts[0], tmp_path / "emb" / "sub", MAX_SEQ_LEN, progress=False)
    with pytest.raises(ValueError, match=r"emb is a file, not a directory"):
        build_cache(manifest, parts[0], tmp_path / "emb", MAX_SEQ_LEN, progress=False)


def test_the_same_vae_loaded_from_another_path_reuses_the_cache(cache, manifest, parts, tmp_path):
    """Where the weights came from (config _name_or_path) is not part of the fingerprint."""
    from diffusers import AutoencoderKL

    conditioner, _ = parts
    conditioner.vae.save_pretrained(tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    digests = set()
    for where in ("a", "b"):
        vae = AutoencoderKL.from_pretrained(tmp_path / where)
        assert str(vae.config._name_or_path).endswith(where)
        loaded = ConditionTokenizer(conditioner.tokenizer, conditioner.text_encoder, vae)
        again = build_cache(manifest, loaded, cache.root, MAX_SEQ_LEN, shard_size=4)
        digests.add(again.info["fingerprint"]["vae"])
    assert digests == {cache.info["fingerprint"]["vae"]}


def interrupted_build(dataset, conditioner, root, monkeypatch):
    """A build killed while writing its second shard: shard 0 landed, nothing else."""
    import ace.train.cache as cache_module

    real, calls = cache_module.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(cache_module, "save_file", save_file)
        with pytest.raises(KeyboardInterrupt):
            build_cache(dataset, conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)
    assert shard_path(root, 0).is_file() and not shard_path(root, 1).is_file()
    assert not (root / "cache.json").exists()


def test_an_interrupted_build_keeps_whole_shards_and_finishes(
    manifest, parts, tmp_path, cache, monkeypatch
):
    conditioner, _ = parts
    root = tmp_path / "emb"
    interrupted_build(manifest, conditioner, root, monkeypatch)
    kept = os.stat(shard_path(root, 0)).st_mtime_ns
    finished = build_cache(manifest, conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)
    assert os.stat(shard_path(root, 0)).st_mtime_ns == kept  # not rewritten
    for i in range(len(manifest)):
        a, b = finished[i], cache[i]
        assert all(torch.equal(x, y) for x, y in zip(a.means + a.texts, b.means + b.texts))


def test_an_interrupted_build_finished_at_another_shard_size_loses_nothing(
    manifest, parts, tmp_path, cache, monkeypatch
):
    """Shard 0 of a 4-sample build holds samples 0-3; a build at shard size 2 must not take
    it for its own shard 0 (samples 0-1) and leave 2-3 unreadable. A killed writer's
    temporary file goes too."""
    conditioner, _ = parts
    root = tmp_path / "emb"
    interrupted_build(manifest, conditioner, root, monkeypatch)
    (root / ".shard-00001.safetensors.tmp-0123abcd").write_bytes(b"half a shard")
    with pytest.warns(UserWarning, match="deleting 1 shards"):
        finished = build_cache(manifest, conditioner, root, MAX_SEQ_LEN, shard_size=2, progress=False)  # fmt: skip
    assert not list(root.glob(".shard-*"))
    for i in range(len(manifest)):
        a, b = finished[i], cache[i]
        assert all(torch.equal(x, y) for x, y in zip(a.means + a.texts, b.means + b.texts))


def test_shards_of_an_interrupted_build_of_other_data_are_not_reused(parts, tmp_path, monkeypatch):
    """The same manifest text over regenerated images of another size: another fingerprint
    (the images' byte sizes and times are in it), so the old build's shard is deleted, not mixed in,
    and a finished cache of the old images is refused."""
    conditioner, _ = parts
    data, root = tmp_path / "data", tmp_path / "emb"
    write_manifest((s.lcu for s in sample_stream(10, seed=3, size=32)), data, progress=False)
    interrupted_build(LCUManifest(data), conditioner, root, monkeypatch)
    text = (data / "manifest.jsonl").read_text()
    for image in (data / "images").iterdir():
        image.unlink()
    write_manifest((s.lcu for s in sample_stream(10, seed=3, size=64)), data, progress=False, overwrite=True)  # fmt: skip
    assert (data / "manifest.jsonl").read_text() == text  # only the images changed
    with pytest.warns(UserWarning, match="deleting 1 shards"):
        cache = build_cache(LCUManifest(data), conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)  # fmt: skip
    for i in range(10):
        assert cache[i].means[0].shape[-1] == 64 // conditioner.vae_factor  # new images only
    fresh = build_cache(LCUManifest(data), conditioner, tmp_path / "fresh", MAX_SEQ_LEN, shard_size=4, progress=False)  # fmt: skip
    assert cache.info["fingerprint"] == fresh.info["fingerprint"]
    old = tmp_path / "old"
    write_manifest((s.lcu for s in sample_stream(10, seed=3, size=32)), old, progress=False)
    build_cache(LCUManifest(old), conditioner, tmp_path / "emb32", MAX_SEQ_LEN, shard_size=4, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="different manifest"):
        build_cache(LCUManifest(data), conditioner, tmp_path / "emb32", MAX_SEQ_LEN, shard_size=4)  # fmt: skip


def test_a_second_build_in_the_same_directory_is_refused(manifest, parts, tmp_path):
    """Two runs building one data.cache at once would delete or mix each other's shards:
    the second is refused at once; once the first is done, it opens the finished cache."""
    from ace.train.lock import run_lock

    conditioner, _ = parts
    root = tmp_path / "emb"
    busy = r"data\.cache .*emb is in use by another run \(pid \d+\)"
    with run_lock(root, "data.cache"), pytest.raises(ValueError, match=busy):  # a build elsewhere
        build_cache(manifest, conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)
    assert not list(root.glob("shard-*"))
    built = build_cache(manifest, conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)
    assert len(built) == len(manifest)


def test_a_damaged_shard_is_rebuilt_or_named(manifest, parts, tmp_path, cache, monkeypatch):
    """A resumed build takes a shard that is there for done only if its header reads (a
    file cut short is built again, warned); a finished cache with a damaged shard is
    refused when opened, naming it, not mid-run by safetensors."""
    conditioner, _ = parts
    root = tmp_path / "emb"
    interrupted_build(manifest, conditioner, root, monkeypatch)
    shard_path(root, 0).write_bytes(shard_path(root, 0).read_bytes()[:100])  # cut short
    with pytest.warns(UserWarning, match=r"shard-00000\.safetensors is unreadable .* building it again"):  # fmt: skip
        finished = build_cache(manifest, conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)  # fmt: skip
    for i in range(len(manifest)):
        a, b = finished[i], cache[i]
        assert all(torch.equal(x, y) for x, y in zip(a.means + a.texts, b.means + b.texts))
    shard_path(root, 1).write_bytes(b"")
    with pytest.raises(ValueError, match=r"emb: shard-00001\.safetensors is unreadable .* delete the directory"):  # fmt: skip
        build_cache(manifest, conditioner, root, MAX_SEQ_LEN, shard_size=4, progress=False)


def test_the_vae_fingerprint_covers_only_what_encodes(manifest, parts):
    """The cache holds unscaled posteriors: a decoder fine-tuned alone, or another scaling
    factor, keeps it; a changed encoder weight does not."""
    conditioner, _ = parts
    base = cache_fingerprint(manifest, conditioner, MAX_SEQ_LEN)
    state = conditioner.vae.state_dict()

    def fingerprint(change, **config):
        vae = type(conditioner.vae).from_config(conditioner.vae.config, **config)
        assert all(vae.config[k] == v for k, v in config.items())
        vae.load_state_dict(state)
        with torch.no_grad():
            change(vae)
        other = ConditionTokenizer(conditioner.tokenizer, conditioner.text_encoder, vae)
        return cache_fingerprint(manifest, other, MAX_SEQ_LEN)

    assert fingerprint(lambda v: v.decoder.conv_out.weight.add_(0.1)) == base
    assert fingerprint(lambda v: v.post_quant_conv.bias.add_(0.1)) == base
    assert fingerprint(lambda v: None, scaling_factor=0.5) == base
    assert fingerprint(lambda v: v.encoder.conv_in.weight.add_(0.1))["vae"] != base["vae"]
    assert fingerprint(lambda v: v.quant_conv.bias.add_(0.1))["vae"] != base["vae"]


def test_a_file_name_the_file_system_refuses_is_fingerprinted(parts, tmp_path):
    """A manifest naming a file too long for the file system: the fingerprint records it as
    missing (the sample skips when read), not an OSError."""
    conditioner, _ = parts
    data = tmp_path / "data"
    write_manifest((s.lcu for s in sample_stream(2, seed=3, size=32)), data, progress=False)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["target"] = "images/" + "x" * 300 + ".png"
    (data / "manifest.jsonl").write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    assert cache_fingerprint(LCUManifest(data), conditioner, MAX_SEQ_LEN)["num_samples"] == 2


def test_a_tokenizer_with_the_same_words_but_other_ids_is_another_fingerprint(manifest, parts):
    """Word vocabularies number words by frequency: the same words, encoder weights and
    sizes can map a text to other ids. The cache's text states would then be stale."""
    from ace.train.word_encoder import word_text_encoder

    a_tok, a_enc = word_text_encoder(["red blue blue", "green"])
    b_tok, b_enc = word_text_encoder(["red red blue", "green"])
    assert set(a_tok.get_vocab()) == set(b_tok.get_vocab())
    assert a_tok("red")["input_ids"] != b_tok("red")["input_ids"]
    assert all(torch.equal(x, y) for x, y in zip(a_enc.state_dict().values(), b_enc.state_dict().values()))  # fmt: skip
    vae = parts[0].vae
    a, b = ConditionTokenizer(a_tok, a_enc, vae), ConditionTokenizer(b_tok, b_enc, vae)
    fa, fb = (
        cache_fingerprint(manifest, a, MAX_SEQ_LEN),
        cache_fingerprint(manifest, b, MAX_SEQ_LEN),
    )
    assert fa["text_encoder"] == fb["text_encoder"] and fa["tokenizer"] != fb["tokenizer"]


def test_the_fingerprint_is_the_same_before_and_after_the_tokenizer_pads(manifest, parts):
    """transformers writes padding and truncation into a fast tokenizer on its first
    padded call (the indicator table's, before the trainer opens its cache): a cache built
    by a fresh process was refused. A transformers upgrade (the T5 config's
    transformers_version) must not refuse it either."""
    from ace.train.word_encoder import word_text_encoder

    tok, enc = word_text_encoder(["red blue", "green"])
    conditioner = ConditionTokenizer(tok, enc, parts[0].vae)
    before = cache_fingerprint(manifest, conditioner, MAX_SEQ_LEN)
    conditioner.indicator_table()  # pads and truncates to 120
    assert json.loads(tok.backend_tokenizer.to_str())["padding"] is not None
    assert cache_fingerprint(manifest, conditioner, MAX_SEQ_LEN) == before
    enc.config.transformers_version = "0.0.1"
    assert cache_fingerprint(manifest, conditioner, MAX_SEQ_LEN) == before


def test_an_image_edited_in_place_at_the_same_byte_size_is_seen(parts, tmp_path):
    """Byte sizes alone miss an edit that keeps the size; the modification time is in the
    fingerprint too, so a finished cache of the old image is refused, as make would."""
    conditioner, _ = parts
    data = tmp_path / "data"
    write_manifest((s.lcu for s in sample_stream(4, seed=5, size=32)), data, progress=False)
    build_cache(LCUManifest(data), conditioner, tmp_path / "emb", MAX_SEQ_LEN, progress=False)
    target = data / json.loads((data / "manifest.jsonl").read_text().splitlines()[0])["target"]
    raw = bytearray(target.read_bytes())
    raw[-20] ^= 0xFF  # same size, other bytes (PIL need not read it: only the digest does)
    stat = target.stat()
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert target.stat().st_size == stat.st_size
    with pytest.raises(ValueError, match="different manifest"):
        build_cache(LCUManifest(data), conditioner, tmp_path / "emb", MAX_SEQ_LEN)
    assert not list((tmp_path / "emb").glob(".*tmp*"))  # the refused cache is left as it was


def test_a_broken_sample_is_skipped_and_named(parts, tmp_path):
    conditioner, _ = parts
    root = tmp_path / "data"
    write_manifest((s.lcu for s in sample_stream(4, seed=5, size=32)), root, progress=False)
    first = json.loads((root / "manifest.jsonl").read_text().splitlines()[0])
    (root / first["target"]).write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping sample 0"):
        cache = build_cache(
            LCUManifest(root), conditioner, tmp_path / "emb", MAX_SEQ_LEN, progress=False
        )
    with pytest.raises(ValueError, match="sample 0 failed to load"):
        cache[0]
    assert isinstance(cache[1], EncodedLCU)
    assert not list((tmp_path / "emb").glob(".*tmp*"))  # no temporary files left
