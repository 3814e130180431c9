"""LLM rewrites of instructions: a local text-generation model paraphrases an instruction,
and only distinct rewrites with the same image references are kept (ACE paper, section 3).

>>> fake = lambda prompt, k, seed: ["Rewrite: paint {image} red", "make {image} red!",
...                                 "colour the whole of {image} in red", "turn it red"][:k]
>>> LLMRewriter(generate_fn=fake).rewrite("make {image} red", 2)
['paint {image} red', 'colour the whole of {image} in red']
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from ace.data.collect.instructions import select_rewrites
from ace.data.collect.local_models import (
    check_model_dir,
    derive_seed,
    load_local,
    resolve_device,
    seeded,
)

GenerateFn = Callable[[str, int, int], list[str]]
"""``(prompt, k, seed) -> k raw completions`` of the prompt: the model's text output."""

REWRITE_PROMPT = (
    "Rewrite the following image-editing instruction in different words, keeping its "
    "meaning. Keep every placeholder in curly braces, such as {image}, exactly as written. "
    "Reply with the rewritten instruction only.\n"
    "Instruction: {instruction}\n"
    "Rewrite:"
)
"""The default prompt; ``{instruction}`` is replaced by the instruction (a plain text
replacement: other braces stay as written)."""


class PromptTooLong(ValueError):
    """An instruction whose prompt, with ``max_new_tokens``, passes the model's positions."""


class LLMRewriter:
    """Paraphrases of instructions by a causal language model from a local directory.

    Args:
        model_path: a directory with the model and its tokenizer (``save_pretrained``);
            loaded with ``AutoModelForCausalLM`` and ``AutoTokenizer``, offline. If the
            tokenizer has a chat template, the prompt is sent as one user message.
        device: where the model runs (default: ``ace.device.default_device()``).
        dtype: the model's dtype (default: as saved, float32 for most).
        max_new_tokens: the longest completion.
        temperature, top_p: sampling parameters.
        seed: the base seed; one ``rewrite`` call is reproducible from the seed and the
            instruction, whatever ran before it (the global random state is left alone).
        prompt: the prompt, with ``{instruction}`` where the instruction goes.
        rounds: at most this many generation rounds per ``rewrite`` call; each asks for
            ``oversample`` candidates per missing rewrite.
        oversample: candidates per missing rewrite in one round.
        threshold: near-duplicate threshold of ``is_near_duplicate``.
        generate_fn: the hook that replaces the model (give ``model_path=None``):
            ``(prompt, k, seed) -> k raw completions``. Tests and other backends (an API,
            vLLM) plug in here; cleaning and filtering are the same.

    ``stats`` counts, over all calls, the candidates generated, accepted and rejected by
    reason.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.9,
        top_p: float = 0.95,
        seed: int = 0,
        prompt: str = REWRITE_PROMPT,
        rounds: int = 3,
        oversample: int = 2,
        threshold: float = 0.8,
        generate_fn: GenerateFn | None = None,
    ) -> None:
        if (model_path is None) == (generate_fn is None):
            raise ValueError("give exactly one of model_path and generate_fn")
        if "{instruction}" not in prompt:
            raise ValueError("the prompt needs an {instruction} field")
        if rounds < 1 or oversample < 1:
            raise ValueError(f"rounds and oversample must be >= 1, got {rounds}, {oversample}")
        self.prompt, self.seed, self.rounds, self.oversample = prompt, seed, rounds, oversample
        self.threshold = threshold
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.stats: Counter[str] = Counter()
        """Candidates ``generated``, ``accepted``, and rejected per reason, over all calls."""
        self.device = resolve_device(device)
        if generate_fn is not None:
            self.generate_fn = generate_fn
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = check_model_dir(model_path, "LLM")
        self.tokenizer = load_local(AutoTokenizer.from_pretrained, path, "LLM tokenizer")
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = load_local(AutoModelForCausalLM.from_pretrained, path, "LLM", **kwargs)
        self.model = model.to(self.device).eval().requires_grad_(False)
        limit = self._positions()
        if limit is not None and max_new_tokens >= limit:  # no prompt would fit: a setting
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in "
                             f"the model's {limit} positions")  # fmt: skip
        self.generate_fn = self._generate

    def _positions(self) -> int | None:
        """The most tokens (prompt + output) the model takes, if its config says."""
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def _generate(self, prompt: str, k: int, seed: int) -> list[str]:
        """``k`` sampled completions of ``prompt`` by the model (the prompt not included)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok(prompt, return_tensors="pt")
        enc = enc.to(self.device)
        n_prompt = enc["input_ids"].shape[1]
        limit = self._positions()
        if limit is not None and n_prompt + self.max_new_tokens > limit:  # an index error below
            raise PromptTooLong(
                f"the prompt is {n_prompt} tokens; with max_new_tokens {self.max_new_tokens} "
                f"that passes the model's {limit} positions"
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with seeded(seed, self.device), torch.inference_mode():
            out = self.model.generate(
                **enc,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=k,
                pad_token_id=pad,
            )
        new = out[:, enc["input_ids"].shape[1] :]  # (k, prompt + new) -> (k, new)
        return tok.batch_decode(new, skip_special_tokens=True)

    def rewrite(self, instruction: str, n: int, seed: int | None = None) -> list[str]:
        """Up to ``n`` rewrites of ``instruction``: each with exactly its set of image
        references, none a near-duplicate of it or of another. After ``rounds`` rounds of
        generation it returns what it has and warns (``UserWarning``) with the count.

        ``seed`` (default: the rewriter's) and the instruction fix the result.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        base = self.seed if seed is None else seed
        prompt = self.prompt.replace("{instruction}", instruction)
        kept: list[str] = []
        generated = 0
        for r in range(self.rounds):
            need = n - len(kept)
            if need <= 0:
                break
            raw = self.generate_fn(
                prompt, need * self.oversample, derive_seed(base, instruction, r)
            )
            generated += len(raw)
            before = len(kept)
            kept, reasons = select_rewrites(instruction, raw, n, kept, self.threshold)
            self.stats.update(reasons)
            self.stats["accepted"] += len(kept) - before
        self.stats["generated"] += generated
        if len(kept) < n:
            warnings.warn(
                f"LLMRewriter: {len(kept)} of {n} rewrites of {instruction!r} found in "
                f"{generated} candidates ({n - len(kept)} missing)",
                stacklevel=2,
            )
        return kept
