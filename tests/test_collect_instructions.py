"""Instructions for collected pairs: templates, text rules, LLM rewrites, pair captions and
scripts/write_instructions.py, on tiny random transformers models built here (offline)."""

import importlib.util
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _scripts import run_script
from PIL import Image

from ace.data import toy
from ace.data.collect.instructions import (
    SLOTS,
    TASK_IMAGES,
    TEMPLATES,
    clean_generation,
    fill_template,
    image_refs,
    is_near_duplicate,
    normalize_instruction,
    rejection_reason,
    select_rewrites,
    template_instruction,
    template_slots,
    templates_for,
    token_jaccard,
    with_article,
)
from ace.data.manifest import LCUManifest, write_manifest
from ace.lcu import ConditionUnit, image_name

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "write_instructions.py"
INSTRUCTION = "make the car in {image} red"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest, and far faster on a busy shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------- templates


def test_every_template_formats_and_validates_with_its_task_images():
    assert set(TEMPLATES) == set(TASK_IMAGES)
    assert set(toy.TASKS) <= set(TEMPLATES)  # the toy world's task names are reused
    slots = {name: "thing" for name in SLOTS}
    for task, templates in TEMPLATES.items():
        n = TASK_IMAGES[task]
        names = {image_name(i) for i in range(n)}
        assert len(templates) >= 3, task
        for t in templates:
            assert template_slots(t) <= set(SLOTS), t
            text = fill_template(t, **slots)
            assert image_refs(text) == names, (task, t)  # every image named, no other
            assert "{" not in text.replace("{image", ""), text  # every slot filled
            ConditionUnit(text, [Image.new("RGB", (8, 8))] * n)  # ace.lcu validation
            # each template is reachable: its own slots select it
            own = {s: "thing" for s in template_slots(t)}
            assert t in templates_for(task, **own), (task, t)


def test_seeded_choice_is_reproducible_and_varies_with_the_seed():
    a = [template_instruction("grayscale", np.random.default_rng(s)) for s in range(20)]
    b = [template_instruction("grayscale", np.random.default_rng(s)) for s in range(20)]
    assert a == b and set(a) == set(TEMPLATES["grayscale"])
    assert template_instruction("add", 5, object="owl") == template_instruction("add", 5, object="owl")  # fmt: skip


def test_slots_fill_the_templates_that_use_the_most_of_them():
    both = templates_for("extract", object="cat", background="a beach")
    assert both and all(template_slots(t) == {"object", "background"} for t in both)
    assert all(template_slots(t) == {"object"} for t in templates_for("extract", object="cat"))
    # a slot no template of the task uses is ignored; None counts as absent
    assert templates_for("grayscale", color="red", caption=None) == TEMPLATES["grayscale"]
    text = template_instruction("replace", 0, object="cat", new_object="owl")
    assert "cat" in text and "an owl" in text


def test_unknown_task_missing_and_bad_slots_raise_naming_them():
    with pytest.raises(ValueError, match="unknown task 'paint_by_numbers'"):
        template_instruction("paint_by_numbers", 0)
    with pytest.raises(ValueError, match=r"task 'recolor' needs slot\(s\) 'color'"):
        template_instruction("recolor", 0, object="car")
    with pytest.raises(ValueError, match="'new_object'"):
        template_instruction("replace", 0, object="car")
    with pytest.raises(ValueError, match="unknown slot 'colour'"):
        template_instruction("recolor", 0, colour="red")
    with pytest.raises(ValueError, match="slot 'color' must be a non-empty string"):
        template_instruction("recolor", 0, color="  ")
    with pytest.raises(ValueError, match="slot 'caption' contains an image reference"):
        template_instruction("text_to_image", 0, caption="a copy of {image}")
    for loose in ("cat in { Image }", "a {x}", "a }"):  # written, then refused by the LCU check
        with pytest.raises(ValueError, match="slot 'object' contains a brace"):
            template_instruction("remove", 0, object=loose)
    with pytest.raises(ValueError, match="needs slot"):
        fill_template("add {a_object} to {image}")


def test_with_article():
    assert with_article("apple") == "an apple"
    assert with_article("red car") == "a red car"
    assert with_article("the dog") == "the dog"
    assert with_article("two cats") == "two cats"
    assert with_article("3 cats") == "3 cats"
    # by sound, not letter: these were "a hour", "an unicorn", "an European car", "an UFO"
    for phrase, article in [("hour", "an"), ("honest face", "an"), ("unicorn", "a"),
                            ("European car", "a"), ("UFO", "a"), ("umbrella", "an"),
                            ("horse", "a"), ("one-way sign", "a"), ("usual cup", "a"),
                            ("unidentified object", "an"), ("uninhabited island", "an"),
                            ("onerous task", "an"), ("uniform", "a")]:  # fmt: skip
        assert with_article(phrase) == f"{article} {phrase}", phrase


# ---------------------------------------------------------------------------- text rules


def test_normalisation_and_near_duplicates_by_hand():
    assert normalize_instruction("Make {image} red.") == "make {image} red"
    assert normalize_instruction("make {image}   red") == "make {image} red"
    assert is_near_duplicate("Make {image} red.", "make {image}   red")
    assert image_refs("put {image1} on {image} and {image}") == {"{image}", "{image1}"}
    assert token_jaccard("make {image} red", "turn {image} red") == 2 / 4
    assert not is_near_duplicate("make {image} red", "turn {image} red")
    # word order only: same word set
    assert is_near_duplicate("in {image}, make the car red", "make the car in {image} red")
    # one word more out of seven: Jaccard 6/7 >= 0.8
    assert is_near_duplicate(INSTRUCTION, INSTRUCTION + " please")
    assert not is_near_duplicate(INSTRUCTION, "give the automobile in {image} a crimson coat")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  paint {image} red\nsecond line", "paint {image} red"),
        ('"paint {image} red"', "paint {image} red"),
        ("\u201cpaint {image} red\u201d", "paint {image} red"),
        ("Rewrite: paint {image} red", "paint {image} red"),
        ("Rewritten instruction: 'paint {image}   red'", "paint {image} red"),
        ("Here are some rewrites:\n1. paint {image} red\n2. x", "paint {image} red"),
        ("- Instruction 2: paint { Image } red", "paint {image} red"),
        ('"paint {image} red', "paint {image} red"),  # a closing quote cut off
        ("paint {IMAGE1} red", "paint {image1} red"),
        ("paint {image10} red", "paint {image10} red"),  # no such image: kept, then rejected
        ("paint { image 12 } red", "paint {image12} red"),
        ("Here is a black-and-white picture", "Here is a black-and-white picture"),  # no colon
        (
            "output-oriented edit of {image}",
            "output-oriented edit of {image}",
        ),  # a hyphen, no prefix
        ("Caption-like {image}", "Caption-like {image}"),
        ("Rewrite - paint {image} red", "paint {image} red"),
        ("", ""),
        ("\n \n", ""),
    ],
)
def test_clean_generation(raw, clean):
    assert clean_generation(raw) == clean


def test_rejection_reasons_by_hand():
    assert rejection_reason("paint {image} red", "make {image} red") is None
    assert rejection_reason("paint it red", "make {image} red") == (
        "image references differ: {image} missing"
    )
    assert rejection_reason("paint {image} like {image1}", "make {image} red") == (
        "image references differ: {image1} added"
    )
    assert rejection_reason("  ", "make {image} red") == "empty"
    assert rejection_reason("make {image} red!", "Make {image} red.") == (
        "duplicate of the instruction"
    )
    assert rejection_reason("paint {image} red", "make {image} red", ["paint {image}  red."]) == (
        "duplicate of an earlier rewrite"
    )
    # a model talking about the task, or leaving placeholders: all were kept before
    stray = "braces that are no image reference"
    for candidate in ["paint the {object} in {image} {color}", "make the car in {{image}} red"]:
        assert rejection_reason(candidate, "make the car in {image} red") == stray, candidate
    said = "Sure! Here is the rewritten instruction: paint the car in {image} crimson"
    assert rejection_reason(said, "make the car in {image} red") == (
        "talks about the task: sure, here is, rewritten instruction"
    )
    kept = "paint the car in {image} crimson. I kept the placeholder {image} as written."
    assert rejection_reason(kept, "make the car in {image} red") == "talks about the task: i kept"
    # plain words are no chatter, and braces the original has are no stray ones
    for fine, original in [
        (
            "recolor the car in {image} red, making sure the rest stays",
            "make the car in {image} red",
        ),
        ("make sure the sky in {image} turns orange", "turn the sky in {image} orange"),
        ("put new text on the sign in {image}", "change the words on the sign in {image}"),
        ("rewrite the sign in {image} so it reads OPEN", "change the sign in {image} to OPEN"),
        ("replace the placeholder text in {image} with SALE", "put SALE on the poster in {image}"),
        (
            "in {image}, write f(x) = {x + 1} in chalk",
            "put f(x) = {x + 1} on the board in {image}",
        ),
    ]:
        assert rejection_reason(fine, original) is None, fine
    # a reference used twice is the same set: kept
    assert rejection_reason("take {image} and colour {image} red", "make {image} red") is None


def test_select_rewrites_keeps_valid_distinct_ones_in_order():
    raw = ["Make {image} red.", "paint {image} red", "paint {image}  red!", "turn it red",
           "colour {image} in red", "tint {image} red"]  # fmt: skip
    kept, reasons = select_rewrites("make {image} red", raw, 2)
    assert kept == ["paint {image} red", "colour {image} in red"]
    assert reasons == {
        "duplicate of the instruction": 1,
        "duplicate of an earlier rewrite": 1,
        "image references differ": 1,
    }
    kept, _ = select_rewrites("make {image} red", ["tint {image} red"], 3, accepted=["x {image}"])
    assert kept == ["x {image}", "tint {image} red"]


# ---------------------------------------------------------------------------- LLM rewriter


class ScriptedLLM:
    """A test double of the model's text output only: replays raw completions in order."""

    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), []

    def __call__(self, prompt, k, seed):
        self.calls.append((prompt, k, seed))
        out, self.outputs = self.outputs[:k], self.outputs[k:]
        return out


def test_rewriter_filters_the_generated_text_through_the_hook():
    from ace.data.collect.rewriter import LLMRewriter

    llm = ScriptedLLM(["Rewrite: paint the car in {image} red", "make the car in {image} red.",
                       "paint the car red", "in {image}, give the car a red coat",
                       "1. paint the car in {image}  red!", "make the car in {image} red please",
                       "redden the car shown in {image}"])  # fmt: skip
    rw = LLMRewriter(generate_fn=llm, seed=7)
    out = rw.rewrite(INSTRUCTION, 3)
    assert out == [
        "paint the car in {image} red",
        "in {image}, give the car a red coat",
        "redden the car shown in {image}",
    ]
    assert INSTRUCTION in llm.calls[0][0] and "{instruction}" not in llm.calls[0][0]
    assert [k for _, k, _ in llm.calls] == [6, 2]  # oversample 2, then the 1 missing
    assert rw.stats["accepted"] == 3 and rw.stats["generated"] == 7
    assert rw.stats["image references differ"] == 1


def test_rewriter_rejects_a_reference_to_no_image_and_goes_on():
    from ace.data.collect.rewriter import LLMRewriter

    llm = ScriptedLLM(["paint the car in {image10} red", "colour the car in { image 12 } red",
                       "paint the car in {image} red", "in {image}, give the car a red coat"])  # fmt: skip
    rw = LLMRewriter(generate_fn=llm)
    assert rw.rewrite(INSTRUCTION, 2) == [
        "paint the car in {image} red",
        "in {image}, give the car a red coat",
    ]
    assert rw.stats["image references differ"] == 2
    assert rejection_reason("paint {image10} red", "make {image} red") == (
        "image references differ: {image} missing; {image10} added"
    )


def test_rewriter_stops_after_bounded_rounds_and_says_how_many_are_missing():
    from ace.data.collect.rewriter import LLMRewriter

    llm = ScriptedLLM(["turn it red"] * 100 + ["paint {image} red"])
    rw = LLMRewriter(generate_fn=llm, rounds=3)
    with pytest.warns(UserWarning, match="0 of 2 rewrites .* \\(2 missing\\)"):
        assert rw.rewrite(INSTRUCTION, 2) == []
    assert len(llm.calls) == 3  # bounded
    # the seed of a call depends on the rewriter's seed, the instruction and the round only
    seeds = [s for _, _, s in llm.calls]
    again = ScriptedLLM(["x"] * 12)
    with pytest.warns(UserWarning):
        LLMRewriter(generate_fn=again, rounds=3).rewrite(INSTRUCTION, 2)
    assert [s for _, _, s in again.calls] == seeds and len(set(seeds)) == 3


def test_rewriter_arguments():
    from ace.data.collect.rewriter import LLMRewriter

    with pytest.raises(ValueError, match="exactly one of"):
        LLMRewriter()
    with pytest.raises(ValueError, match="no model at"):
        LLMRewriter("/nonexistent/llm")
    with pytest.raises(ValueError, match=r"\{instruction\}"):
        LLMRewriter(generate_fn=ScriptedLLM([]), prompt="rewrite this")


LLM_WORDS = [
    "[PAD]", "[UNK]", "[EOS]", "{image}", "{image1}", "make", "the", "car", "in", "red", "turn",
    "colour", "of", "to", "paint", "blue", "green", "picture", "so", "that", "it", "is", "a",
    "give", "coat", "please", "now", "change", "shown",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 2-layer GPT-2 and a word-level tokenizer built in code, saved to a directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("llm")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LLM_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "{image}" stays one token
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]"
    ).save_pretrained(path)
    config = GPT2Config(vocab_size=len(LLM_WORDS), n_positions=128, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=2, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_rewriter_on_a_tiny_random_gpt2(tiny_llm):
    from ace.data.collect.rewriter import LLMRewriter

    state = torch.get_rng_state()
    rw = LLMRewriter(tiny_llm, device="cpu", max_new_tokens=10, temperature=1.0, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = rw.rewrite(INSTRUCTION, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    assert 1 <= len(out) <= 3 and rw.stats["generated"] >= 6
    for i, text in enumerate(out):
        assert isinstance(text, str) and image_refs(text) == {"{image}"}
        assert not is_near_duplicate(text, INSTRUCTION)
        assert not any(is_near_duplicate(text, other) for other in out[:i])
        ConditionUnit(text, [Image.new("RGB", (8, 8))])
    if len(out) < 3:
        assert any(f"{len(out)} of 3 rewrites" in str(w.message) for w in caught)
    # seeded: a fresh rewriter from the same directory gives the same rewrites
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert LLMRewriter(tiny_llm, device="cpu", max_new_tokens=10, temperature=1.0,
                           seed=3).rewrite(INSTRUCTION, 3) == out  # fmt: skip


def test_rewriter_refuses_a_prompt_past_the_models_positions(tiny_llm, tmp_path, capsys):
    """A long instruction was an IndexError inside generate, partway through a run."""
    from ace.data.collect.rewriter import LLMRewriter, PromptTooLong

    rw = LLMRewriter(tiny_llm, device="cpu", max_new_tokens=10, seed=3)
    limit = rw.model.config.n_positions
    base = len(rw.tokenizer(rw.prompt.replace("{instruction}", "paint {image} red"))["input_ids"])
    fits = "paint {image} " + "very " * (limit - 10 - base) + "red"  # exactly the limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer rewrites than asked: fine here
        rw.rewrite(fits, 1)
    with pytest.raises(PromptTooLong, match=rf"passes the model's {limit} positions"):
        rw.rewrite("very " + fits, 1)  # one token over, with the 10 new ones
    with pytest.raises(ValueError, match=rf"leaves no room for a prompt in the model's {limit}"):
        LLMRewriter(tiny_llm, device="cpu", max_new_tokens=limit)
    # the script: a setting no prompt fits is refused before anything is written
    data = tmp_path / "data"
    write_manifest([next(toy.sample_stream(1, 0, tasks="add")).lcu], data)
    out = tmp_path / "out"
    argv = [data, "--out", out, "--mode", "rewrite", "--model", tiny_llm, "--device", "cpu"]
    code, _, err = run([*argv, "--max-new-tokens", str(limit)], capsys)
    assert code == 2 and "leaves no room for a prompt" in err and not out.exists()


def test_rewriter_sends_the_prompt_through_a_chat_template(tiny_llm, tmp_path):
    from transformers import AutoTokenizer

    from ace.data.collect.rewriter import LLMRewriter

    chat = tmp_path / "chat-llm"
    chat.mkdir()
    for f in tiny_llm.iterdir():
        (chat / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(tiny_llm, local_files_only=True)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} now{% endif %}"
    )
    tok.save_pretrained(chat)
    rw = LLMRewriter(chat, device="cpu", max_new_tokens=10, temperature=1.0, seed=1)
    seen = []
    apply = rw.tokenizer.apply_chat_template
    rw.tokenizer.apply_chat_template = lambda m, **kw: seen.append(m) or apply(m, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = rw.rewrite(INSTRUCTION, 2)
    assert seen and INSTRUCTION in seen[0][0]["content"] and seen[0][0]["role"] == "user"
    assert all(image_refs(t) == {"{image}"} for t in out)


# ---------------------------------------------------------------------------- pair captioner

BLIP_WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "the", "right", "half", "of", "this",
    "picture", "is", "an", "edited", "version", "left", "write", "editing", "instruction", "that",
    "turns", "image", "into", "make", "car", "red", "blue", "add", "remove", "a", "dog", "cat",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random one-layer BLIP captioner with a BERT tokenizer from a vocab written here."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
    )
    from transformers import BlipImageProcessorPil as ImageProcessor  # no torchvision needed

    path = tmp_path_factory.mktemp("vlm")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(BLIP_WORDS) + "\n")
    tokenizer = BertTokenizerFast(str(vocab), additional_special_tokens=["[DEC]"])
    vocab.unlink()
    BlipProcessor(ImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(path)
    text = dict(vocab_size=len(BLIP_WORDS), hidden_size=32, encoder_hidden_size=32,
                intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=5, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=16)  # fmt: skip
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32,
                        image_text_hidden_size=32)  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(path)
    return path


def test_side_by_side_puts_the_target_right_at_the_source_height():
    from ace.data.collect.captioner import side_by_side

    pair = side_by_side(Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 255)))  # fmt: skip
    assert pair.size == (60, 20)
    assert pair.getpixel((39, 10)) == (255, 0, 0) and pair.getpixel((40, 10)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("raw", "instruction"),
    [
        ("Make the car in the left image red.", "Make the car in {image} red."),
        ("make the first picture brighter", "make {image} brighter"),
        ("Answer: add a dog to image 1", "add a dog to {image}"),
        ("The car is now red", "in {image}, the car is now red"),
        ("TV removed", "in {image}, TV removed"),
        ("put {image1} on the table", "in {image}, put image1 on the table"),
        ("paint { image 12 } red", "in {image}, paint image12 red"),  # was {image12}: invalid
    ],
)
def test_caption_to_instruction(raw, instruction):
    from ace.data.collect.captioner import caption_to_instruction

    assert caption_to_instruction(raw) == instruction
    ConditionUnit(instruction, [Image.new("RGB", (8, 8))])


@pytest.mark.parametrize("raw", ["make it {color}", "make {{image}} red", "the {object} is gone"])
def test_caption_with_unfilled_braces_is_no_instruction(raw):
    from ace.data.collect.captioner import caption_to_instruction

    with pytest.raises(ValueError, match="braces that are no image reference"):
        caption_to_instruction(raw)


@pytest.mark.parametrize(
    "raw", ["in the left image, the second image shows a red car", "make it look like image 2", "Match the edited picture's colours"]
)  # fmt: skip
def test_a_caption_naming_the_target_is_no_instruction(raw):
    """It would read "in {image}, the second image shows ...": an image the LCU lacks."""
    from ace.data.collect.captioner import caption_to_instruction

    with pytest.raises(ValueError, match="names the target image"):
        caption_to_instruction(raw)


def test_caption_to_instruction_rejects_an_empty_answer():
    from ace.data.collect.captioner import caption_to_instruction

    with pytest.raises(ValueError, match="no instruction"):
        caption_to_instruction(' "" \n')


def test_vlm_pair_captioner_on_a_tiny_random_blip(tiny_vlm):
    from ace.data.collect.captioner import PairCaptioner, VLMPairCaptioner
    from ace.data.collect.instructions import VLMPairCaptioner as reexported

    assert reexported is VLMPairCaptioner
    cap = VLMPairCaptioner(tiny_vlm, device="cpu", max_new_tokens=8,
                           generate_kwargs={"min_new_tokens": 3})  # fmt: skip
    assert isinstance(cap, PairCaptioner)
    src, dst = Image.new("RGB", (48, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))
    answer = cap.answer(src, dst)
    assert answer and not answer.startswith("the right half")  # the prompt echo is removed
    text = cap.describe(src, dst)
    assert isinstance(text, str) and "{image}" in text
    ConditionUnit(text, [src])
    assert cap.describe(src, dst) == text  # greedy: deterministic


LLAVA_WORDS = [
    "[PAD]", "[UNK]", "[EOS]", "<image>", "USER:", "ASSISTANT:", "make", "the", "car", "red",
    "in", "first", "second", "image", "edit", "left", "add", "a", "dog",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random LLaVA (tiny CLIP vision tower, one-layer Llama) whose processor has a chat
    template: the path of multi-image chat VLMs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil as ImageProcessor
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    path = tmp_path_factory.mktemp("llava")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LLAVA_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]",
                                        pad_token="[PAD]", extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    chat = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    )
    images = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(images, tokenizer, patch_size=16, vision_feature_select_strategy="default",
                   chat_template=chat, num_additional_image_tokens=1).save_pretrained(path)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=16)  # fmt: skip
    text = LlamaConfig(vocab_size=len(LLAVA_WORDS), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=2)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=3,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("layout", ["two_images", "side_by_side"])
def test_vlm_pair_captioner_on_a_tiny_chat_vlm(tiny_llava, layout):
    from ace.data.collect.captioner import VLMPairCaptioner

    cap = VLMPairCaptioner(tiny_llava, layout=layout, device="cpu", max_new_tokens=6,
                           generate_kwargs={"min_new_tokens": 3})  # fmt: skip
    assert cap.chat
    src, dst = Image.new("RGB", (40, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))
    n_images = cap._inputs(src, dst)["pixel_values"].shape[0]
    assert n_images == (2 if layout == "two_images" else 1)
    answer = cap.answer(src, dst)
    assert answer and "USER:" not in answer and "ASSISTANT:" not in answer  # no prompt echo
    text = cap.describe(src, dst)
    assert "{image}" in text
    ConditionUnit(text, [src])


def test_vlm_pair_captioner_errors(tiny_vlm, tmp_path):
    from ace.data.collect.captioner import VLMPairCaptioner

    with pytest.raises(ValueError, match=r"no model at .*nowhere"):
        VLMPairCaptioner(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no config\.json"):
        VLMPairCaptioner(tmp_path)
    with pytest.raises(ValueError, match="needs a processor with a chat template"):
        VLMPairCaptioner(tiny_vlm, layout="two_images")
    with pytest.raises(ValueError, match="unknown layout"):
        VLMPairCaptioner(tiny_vlm, layout="stacked")


# ---------------------------------------------------------------------------- write_instructions.py

FREE_TASKS = ["edge_map", "segmentation_map", "grayscale", "edge_to_image", "merge", "reference"]


def run(argv, capsys):
    return run_script(SCRIPT, argv, capsys)


def load_script():
    spec = importlib.util.spec_from_file_location("write_instructions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """Six toy LCUs of tasks whose templates need no slots, and three recolor edits."""
    root = tmp_path_factory.mktemp("toy")
    write_manifest((s.lcu for s in toy.sample_stream(6, 0, tasks=FREE_TASKS, size=32)),
                   root / "free", progress=False)  # fmt: skip
    write_manifest((s.lcu for s in toy.sample_stream(3, 0, tasks="recolor", size=32)),
                   root / "recolor", progress=False)  # fmt: skip
    return root


def test_output_records_keep_their_images_reachable_from_the_new_directory(tmp_path):
    module = load_script()
    src, dst = tmp_path / "data", tmp_path / "out" / "sub"
    record = {"turns": [{"instruction": "a", "images": ["images/x.png", "/abs/y.png"],
                         "masks": [None, "images/m.png"]}],
              "target": "images/t.png", "target_mask": None, "task": "add",
              "meta": {"id": 7}}  # fmt: skip
    out = module.output_record(record, "add a cat to {image}", {"mode": "template"}, src, dst)
    assert out["turns"][0] == {"instruction": "add a cat to {image}",
                               "images": ["../../data/images/x.png", "/abs/y.png"],
                               "masks": [None, "../../data/images/m.png"]}  # fmt: skip
    assert out["target"] == "../../data/images/t.png" and out["target_mask"] is None
    assert out["meta"] == {"id": 7, "instruction_source": {"mode": "template"}}
    assert record["turns"][0]["instruction"] == "a"  # the input record is untouched


def test_template_mode_end_to_end(toy_data, tmp_path, capsys):
    out = tmp_path / "nested" / "out"
    code, stdout, _ = run(
        [toy_data / "free", "--out", out, "--mode", "template", "--quiet"], capsys
    )
    assert code == 0 and "wrote 6 records from 6 inputs" in stdout
    ds, src = LCUManifest(out), LCUManifest(toy_data / "free")
    assert ds.validate() == [] and len(ds) == 6 and ds.tasks == src.tasks
    assert not (out / "manifest.partial.jsonl").exists()
    for new, old in zip(ds.records, src.records):
        assert new["turns"][-1]["instruction"] in {
            fill_template(t) for t in templates_for(new["task"])
        }
        assert new["meta"]["instruction_source"] == {
            "mode": "template", "original": old["turns"][-1]["instruction"], "variant": 0}  # fmt: skip
        assert new["target"] == os.path.relpath(toy_data / "free" / old["target"], out)
    # same arguments, same bytes; --variants 2 gives two different instructions per input
    code, _, _ = run([toy_data / "free", "--out", tmp_path / "nested" / "again", "--mode", "template", "--quiet"], capsys)  # fmt: skip
    assert (tmp_path / "nested" / "again" / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()  # fmt: skip
    code, _, _ = run([toy_data / "free", "--out", tmp_path / "v2", "--mode", "template", "--variants", 2, "--quiet"], capsys)  # fmt: skip
    v2 = LCUManifest(tmp_path / "v2")
    assert code == 0 and len(v2) == 12 and v2.validate() == []
    pairs = [r["turns"][-1]["instruction"] for r in v2.records]
    assert all(a != b for a, b in zip(pairs[::2], pairs[1::2]))


def test_template_mode_takes_slots_from_meta(toy_data, tmp_path, capsys):
    data = tmp_path / "slotted"
    data.mkdir()
    lines = (toy_data / "recolor" / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    for r in records:
        r["meta"] = {"slots": {"object": "shape", "color": "teal"}}
        for turn in r["turns"]:
            turn["images"] = [f"../{toy_data.name}/recolor/{p}" for p in turn["images"]]
            turn["masks"] = None
        r["target"] = f"../{toy_data.name}/recolor/{r['target']}"
    os.symlink(toy_data, tmp_path / toy_data.name)
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, _, err = run([data, "--out", tmp_path / "out", "--mode", "template", "--quiet"], capsys)
    assert code == 0, err
    ds = LCUManifest(tmp_path / "out")
    assert ds.validate() == []
    assert all("teal" in r["turns"][-1]["instruction"] for r in ds.records)
    assert all(r["meta"]["slots"] == {"object": "shape", "color": "teal"} for r in ds.records)


def test_resume_after_an_interruption_gives_the_same_manifest(toy_data, tmp_path, capsys):
    args = [toy_data / "free", "--mode", "template", "--variants", 2, "--seed", 5, "--quiet"]
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0

    module, calls = load_script(), []
    make_writer = module.make_writer

    def interrupted(*a):
        writer = make_writer(*a)

        def write(record, line):
            calls.append(line)
            if len(calls) == 4:
                raise KeyboardInterrupt  # killed while the fourth input is being written
            return writer(record, line)

        return write

    module.make_writer = interrupted
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        module.main([*map(str, args), "--out", str(out)])
    partial = out / "manifest.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 3 and not (out / "manifest.jsonl").exists()
    with open(partial, "a") as f:
        f.write('{"line": 4, "records": [{"tur')  # a line cut off by a kill
    # other arguments do not mix with the partial run
    code, _, err = run([*args[:-3], "--seed", 6, "--quiet", "--out", out], capsys)
    assert code == 2 and "from a run with other arguments" in err and partial.exists()
    calls.clear()
    module.make_writer = make_writer
    assert run([*args, "--out", out], capsys)[0] == 0
    whole = (tmp_path / "whole" / "manifest.jsonl").read_text()
    resumed = (out / "manifest.jsonl").read_text()
    assert resumed == whole  # siblings: the same relative paths too
    assert not partial.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{data}/missing", "--mode", "template"], "no LCU manifest at"),
        (["{recolor}", "--mode", "template"], r"line 1: task 'recolor' needs slot\(s\) 'color'"),
        (["{bad_task}", "--mode", "template"], "line 1: unknown task 'sculpt'"),
        (["{free}", "--mode", "rewrite", "--model", "{data}/no-llm"], "no-llm: no such directory"),
        (["{free}", "--mode", "caption", "--model", "{data}"], "VLM: .* has no config.json"),
        (["{free}", "--mode", "caption"], "--mode caption needs --model"),
        (["{free}", "--mode", "template", "--variants", "0"], "--variants must be at least 1"),
        (["{free}", "--mode", "template", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["{free}", "--mode", "template", "--variants", "two"], "invalid int value: 'two'"),
        # checked before the model loads: 0 new tokens failed after it, leaving a partial file
        (
            ["{free}", "--mode", "rewrite", "--model", "{data}", "--max-new-tokens", "0"],
            "--max-new-tokens must be at least 1, got 0",
        ),
        (["{free}", "--mode", "rewrite", "--model", "{data}", "--device", "nonsense"], "--device"),
    ],
)
def test_bad_input_exits_2_with_one_line_writing_nothing(toy_data, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad_task"
    bad.mkdir()
    text = (toy_data / "free" / "manifest.jsonl").read_text()
    (bad / "manifest.jsonl").write_text(re.sub(r'"task": "\w+"', '"task": "sculpt"', text, count=1))
    names = {"data": tmp_path, "free": toy_data / "free", "recolor": toy_data / "recolor",
             "bad_task": bad}  # fmt: skip
    out = tmp_path / "out"
    code, stdout, err = run([a.format(**names) for a in argv] + ["--out", out], capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("write_instructions.py: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_an_interrupted_final_write_leaves_no_temporary_file(
    toy_data, tmp_path, capsys, monkeypatch
):
    args = [toy_data / "free", "--out", tmp_path / "o", "--mode", "template", "--quiet"]

    def killed(*a):
        raise KeyboardInterrupt  # killed as the finished manifest is renamed into place

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            load_script().main(list(map(str, args)))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.partial.jsonl"]
    assert run(args, capsys)[0] == 0  # the rerun finishes from the partial file
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.jsonl"]


def test_existing_output_needs_overwrite(toy_data, tmp_path, capsys):
    args = [toy_data / "free", "--out", tmp_path / "o", "--mode", "template", "--quiet"]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert run([*args, "--overwrite"], capsys)[0] == 0


def test_rewrite_mode_end_to_end_on_a_tiny_llm(toy_data, tiny_llm, tmp_path, capsys):
    out = tmp_path / "rw"
    code, stdout, err = run([toy_data / "free", "--out", out, "--mode", "rewrite", "--model", tiny_llm,
                             "--variants", 2, "--max-new-tokens", 10, "--device", "cpu", "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    ds, src = LCUManifest(out), LCUManifest(toy_data / "free")
    assert 1 <= len(ds) <= 12 and ds.validate() == []
    for r in ds.records:
        old = r["meta"]["instruction_source"]["original"]
        assert image_refs(r["turns"][-1]["instruction"]) == image_refs(old)
        assert not is_near_duplicate(r["turns"][-1]["instruction"], old)
    if len(ds) < 12:
        assert f"({12 - len(ds)} missing)" in stdout
    assert {r["meta"]["instruction_source"]["original"] for r in ds.records} <= {
        r["turns"][-1]["instruction"] for r in src.records
    }


def test_caption_mode_end_to_end_on_a_tiny_blip(toy_data, tiny_vlm, tmp_path, capsys):
    out = tmp_path / "cap"
    code, _, err = run([toy_data / "free", "--out", out, "--mode", "caption", "--model", tiny_vlm,
                             "--max-new-tokens", 8, "--device", "cpu", "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    ds = LCUManifest(out)
    assert ds.validate() == [] and 1 <= len(ds) <= 6
    assert all("{image}" in r["turns"][-1]["instruction"] for r in ds.records)


@pytest.mark.parametrize("module", ["instructions", "rewriter", "captioner"])
def test_docstring_examples(module):
    """The modules' examples run as written (they were checked by hand only)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"ace.data.collect.{module}"))
    assert result.attempted > 0 and result.failed == 0
