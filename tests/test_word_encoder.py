"""The word-level text encoder of the CPU demo (model.text_encoder=words)."""

import pytest
import torch

from ace.conditioning import ConditionTokenizer, clean_text
from ace.pipeline import ACEPipeline
from ace.testing import tiny_vae
from ace.train import Trainer, load_config
from ace.train.word_encoder import fit_word_tokenizer, word_text_encoder
from tests.test_train import CONFIG, args, data  # noqa: F401 (data is a fixture)

TEXTS = ["Make {image} red.", "put {image1} on {image2}, please", "a red circle"]


def test_every_word_is_one_token_and_unseen_words_are_unk():
    tok = fit_word_tokenizer(TEXTS)
    # the vocabulary, written out by hand: 3 special tokens, then each distinct token once
    words = {"make", "{image}", "red", ".", "put", "{image1}", "on", "{image2}", ",", "please"}
    words |= {"a", "circle"}
    words |= {"{image3}", "{image4}", "{image5}", "{image6}", "{image7}", "{image8}", "{image9}"}
    assert set(tok.get_vocab()) == words | {"<pad>", "</s>", "<unk>"}
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    ids = tok("PUT {image1} on a blue circle")["input_ids"]
    expected = ["put", "{image1}", "on", "a", "<unk>", "circle", "</s>"]
    assert tok.convert_ids_to_tokens(ids) == expected
    assert tok("")["input_ids"] == [1]  # the empty (unconditional) prompt is T5's lone </s>


def test_every_image_name_is_a_word_and_the_indicator_rows_differ():
    """An LCU renames a turn's references to global names ({image2} in a multi-turn LCU
    whose raw instructions only say {image}); each must stay its own word, and the ten
    indicator rows must differ, or frames share an indicator."""
    from ace.lcu import LCU, ConditionUnit

    tok, enc = word_text_encoder(["make {image} red", "now blue"])
    turn = ConditionUnit("make {image} red", [torch.zeros(3, 16, 16)])
    lcu = LCU(ConditionUnit("now blue"), history=[turn, turn])
    renamed = lcu.instructions()[1]
    assert renamed == "make {image1} red"
    ids = tok(renamed)["input_ids"]
    assert tok.unk_token_id not in ids
    table = ConditionTokenizer(tok, enc, tiny_vae()).indicator_table()
    assert table.shape[0] == 10
    assert torch.cdist(table, table).add(torch.eye(10)).min() > 0


def test_a_colour_word_moves_the_states_more_than_with_bytes():
    """The point of the encoder: the only differing word changes one token, whose state
    differs strongly; the rest of the sentence keeps its tokens."""
    tok, enc = word_text_encoder(["make {image} red", "make {image} blue"])
    c = ConditionTokenizer(tok, enc, tiny_vae())
    red, blue = c.encode_text(["make {image} red", "make {image} blue"])
    assert red.shape == blue.shape == (4, 32)  # make, {image}, colour, </s>
    cos = torch.nn.functional.cosine_similarity(red[2], blue[2], dim=0)
    assert cos < 0.9


def test_the_encoder_is_seeded_and_empty_texts_are_an_error():
    a = word_text_encoder(TEXTS, seed=3)[1].state_dict()
    b = word_text_encoder(TEXTS, seed=3)[1].state_dict()
    c = word_text_encoder(TEXTS, seed=4)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="no words"):
        fit_word_tokenizer(["", "   "])


def test_training_with_words_exports_a_pipeline_that_encodes_the_same(
    data,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    import ace.data.manifest

    reads = []
    real = ace.data.manifest.LCUManifest
    monkeypatch.setattr(ace.data.manifest, "LCUManifest", lambda *a: reads.append(a) or real(*a))
    out = tmp_path / "run"
    trainer = Trainer(load_config(CONFIG, args(data, out, 2, "model.text_encoder=words")))
    assert len(reads) == 1  # one read of the manifest serves the vocabulary and the batches
    trainer.train()
    pipe = ACEPipeline.from_pretrained(out / "pipeline")
    prompt = clean_text("make {image} the next colour")
    want = trainer.conditioner.encode_text([prompt])[0]
    got = pipe.conditioner.encode_text([prompt])[0]
    assert got.shape[0] == 6  # make, {image}, the, next, colour, </s>: one token per word
    torch.testing.assert_close(got, want)


def test_words_needs_a_manifest():
    cfg = load_config(CONFIG, ["model.text_encoder=words", "data.manifest=''", "data.shards=x.tar"])
    with pytest.raises(ValueError, match=r"set data\.manifest"):
        Trainer(cfg)


def test_a_vocabulary_past_thirty_thousand_words_keeps_them_all():
    """The tokenizers trainer keeps 30,000 tokens unless told otherwise, and cut the image
    names first ("{" sorts after letters): {image9} became <unk>. Every word and every
    image name keeps its own id."""
    from ace.lcu import INDICATOR_NAMES
    from ace.train.word_encoder import fit_word_tokenizer

    tok = fit_word_tokenizer([" ".join(f"w{i}" for i in range(35_000))])
    assert len(tok) == 35_000 + len(INDICATOR_NAMES) + 3  # + <pad>, </s>, <unk>
    ids = tok("w34999 w5 {image9}").input_ids
    assert tok.unk_token_id not in ids and len(set(ids)) == 4
