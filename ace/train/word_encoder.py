"""A word-level text encoder for training from scratch without T5 weights (the CPU demo).

ACE reads instructions through T5-XXL, whose states already tell "red" from "blue". With
no weights on disk, the stand-in is a random T5: ``ace.testing.tiny_text_encoder`` reads
BYTES, so a colour word is spread over several random byte states, and in a run of a few
hundred steps the DiT learned little from the instruction: blanking it moved a
segmentation-map prediction by 4%, against 35% with this encoder (``BENCHMARKS.md``,
``scripts/probe.py``). This encoder gives each word of the training instructions its
own token instead, so a word is one random vector that cross-attention can read at
once:

    from ace.train.word_encoder import word_text_encoder
    tokenizer, text_encoder = word_text_encoder(["add a red circle to {image}", ...])

The tokenizer is a ``tokenizers`` WordLevel model fitted on the given texts (lowercased;
unseen words map to ``<unk>``) and on every image name ``{image}``, ``{image1}``, ...
``{image9}``, each one token: an LCU renames a turn's references to global names that
its raw instruction need not hold, and the indicator table encodes all ten. It is wrapped in a
``PreTrainedTokenizerFast`` with T5's special tokens (pad 0, eos 1, unk 2) and T5's
trailing ``</s>``. The encoder is the same seeded random 2-layer T5 v1.1 as the tiny one,
sized to the vocabulary. Both save and load with the pipeline like any tokenizer and
encoder.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ace.lcu import INDICATOR_NAMES

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
WORD = Regex(r"\{image\d*\}|\w+|[^\w\s]")
"""One token: an image reference, a word, or one punctuation mark."""


def fit_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary is every token of ``texts`` (no minimum count)
    and every image name of ``INDICATOR_NAMES``."""
    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(WORD, behavior="isolated")]
    )
    # no cap (the trainer's default keeps 30,000 tokens, cutting image names first: "{"
    # sorts after letters); for a vocabulary under the cap the ids are the same
    trainer = WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS), min_frequency=0, vocab_size=2**31 - 1
    )
    texts = list(texts)
    if not any(t.strip() for t in texts):  # every non-space character is a token
        raise ValueError("fit_word_tokenizer: the texts hold no words to build a vocabulary from")
    tok.train_from_iterator([*texts, " ".join(INDICATOR_NAMES)], trainer=trainer)
    missing = [n for n in INDICATOR_NAMES if tok.token_to_id(n) is None]
    if missing:  # cannot happen with no cap; the indicator table depends on it
        raise ValueError(f"fit_word_tokenizer: image names {missing} missing from the vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def word_text_encoder(
    texts: Iterable[str], d_model: int = 32, seed: int = 0
) -> tuple[PreTrainedTokenizerFast, T5EncoderModel]:
    """(tokenizer fitted on ``texts``, seeded random T5 encoder over its vocabulary)."""
    tokenizer = fit_word_tokenizer(texts)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, like the released T5-XXL
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    return tokenizer, encoder.eval()
