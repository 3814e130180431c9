"""A thin trainer on accelerate: the same code on one CPU or many GPUs.

    from ace.train import Trainer, load_config
    Trainer(load_config("configs/tiny.yaml", ["train.max_steps=8"])).train()

Per step: take this rank's slice of the global batch, encode it with the frozen T5 and
VAE, pack it, and let the objective draw timesteps and noise (``ace.diffusion``). All
randomness of step s comes from a generator seeded with (seed, s, rank), and the data
order from (seed, epoch), so resuming from a checkpoint replays exactly what an
uninterrupted run would have done.

Writes OUTPUT/metrics.jsonl, OUTPUT/checkpoint-STEP/ (accelerate state: model,
optimizer, LR schedule, EMA, RNG; renamed into place only when complete) and, at the
end, OUTPUT/pipeline/ (an ACEPipeline; EMA weights when EMA is on).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ace.atomic import atomic_write, fsync_dir, fsync_tree, nearest_existing
from ace.conditioning import ConditionTokenizer, resize_budget
from ace.device import fused_adamw
from ace.diffusion import make_objective
from ace.train.batch import encode_batch, noisy_tokens
from ace.train.cache import tokenizer_digest, vae_digest
from ace.train.config import Config, OptimConfig, to_dict
from ace.train.data import build_dataset, costs_digest, make_batches, records_digest
from ace.train.ema import load_ema_shard, local_part, save_ema_shard
from ace.train.lock import check_free, run_lock

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainingStopped(RuntimeError):
    """The run stopped itself: ``train.max_nonfinite`` steps in a row with a non-finite loss
    (each of them skipped). Its last
    checkpoint is intact; ``train.py`` prints the message in one line and exits with 1."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of everything random in one step of one rank: a pure function of the three."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def lr_factor(step: int, warmup: int, decay: str, total: int) -> float:
    """The learning rate of ``step`` (0-based) over the base rate: linear warm-up over
    ``warmup`` steps, then constant, or a cosine that reaches 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def ensure_vae(cfg: Config, accelerator) -> None:
    """Train the toy VAE into ``model.vae`` first when asked and it is not there yet, on
    the run's device (the main process trains; the others wait)."""
    m = cfg.model
    if m.vae == "tiny" or m.pretrained or m.vae_toy_steps <= 0:
        return
    vae = Path(m.vae)
    there = vae.is_file() or (vae.is_dir() and any(vae.iterdir()))  # an empty one is trained into
    if there and not (vae / "config.json").is_file():
        raise ValueError(
            f"model.vae={m.vae} is there but holds no VAE (no config.json); delete it to "
            f"train the toy VAE into it (model.vae_toy_steps={m.vae_toy_steps})"
        )
    if there:  # kept as it is, however it was trained: say when that differs
        from ace.train.vae import toy_vae_mismatch

        differ = toy_vae_mismatch(m.vae, m.vae_toy_steps, cfg.data.toy_size, cfg.train.seed)
        if differ and accelerator.is_main_process:
            warnings.warn(
                f"model.vae={m.vae} is used as it is, but its training.json differs from "
                f"what model.vae_toy_steps, data.toy_size and train.seed ask for ({differ}); "
                "delete it to train the VAE this config asks for",
                stacklevel=2,
            )
    elif accelerator.is_main_process:
        from ace.train.vae import train_toy_vae

        with torch.random.fork_rng(devices=[]):
            train_toy_vae(  # on images of the toy data's size
                m.vae,
                steps=m.vae_toy_steps,
                seed=cfg.train.seed,
                device=accelerator.device,
                size=cfg.data.toy_size,
            )
    # every rank, however it found model.vae: one that looked after the main process had
    # saved it would otherwise skip this barrier while the others wait at it
    accelerator.wait_for_everyone()


def check_model_dirs(cfg: Config) -> None:
    """Raise ValueError unless ``model.vae`` is "tiny" or a directory and
    ``model.text_encoder`` is "tiny", "words" or a directory (or the model comes whole from
    ``model.pretrained``): before any data is made for a run that cannot start."""
    m = cfg.model
    if m.pretrained:
        if not (Path(m.pretrained) / "model_index.json").is_file():
            raise ValueError(
                f"model.pretrained: no ACEPipeline directory at {m.pretrained} (no "
                "model_index.json); convert the release first (scripts/convert_official.py), "
                "or set model.pretrained=null to train from scratch"
            )
        check_pretrained_objective(cfg)
        return
    if m.vae != "tiny" and m.vae_toy_steps <= 0 and not Path(m.vae).is_dir():
        raise ValueError(
            f"model.vae: no VAE directory at {m.vae} "
            "(set model.vae_toy_steps > 0 to train the toy VAE there first)"
        )
    if m.text_encoder not in ("tiny", "words") and not Path(m.text_encoder).is_dir():
        raise ValueError(
            f"model.text_encoder: {m.text_encoder} is not tiny, words or a T5 directory "
            "(a transformers T5 encoder with its tokenizer)"
        )


def config_objective(cfg: Config):
    """The ``Objective`` the config trains."""
    o = cfg.objective
    return make_objective(o.name, **({"shift": o.shift} if o.name == "rectified-flow" else {}))


def check_pretrained_objective(cfg: Config) -> None:
    """ValueError unless the config trains the objective ``model.pretrained``'s scheduler
    samples: fine-tuning a flow model on epsilon targets (the default objective) would run,
    and export it with a DDIM scheduler."""
    import diffusers

    from ace.diffusion import objective_for_scheduler

    folder = Path(cfg.model.pretrained) / "scheduler"
    try:
        name = json.loads((folder / "scheduler_config.json").read_text())["_class_name"]
        scheduler = getattr(diffusers, name).from_pretrained(folder)
        theirs = objective_for_scheduler(scheduler)
    except (OSError, KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"model.pretrained: cannot read its scheduler in {folder}: {e}") from e
    ours = config_objective(cfg)
    if theirs != ours:
        shift = f" objective.shift={theirs.shift}" if theirs.name == "rectified-flow" else ""
        raise ValueError(
            f"model.pretrained {cfg.model.pretrained} samples {theirs} but this config trains "
            f"{ours}; train it as it was trained (objective.name={theirs.name}{shift})"
        )


class Components(NamedTuple):
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    indicators: torch.Tensor | None = None
    """model.pretrained's stored indicator table (10, E), which its transformer learned
    with; None: compute it from the text encoder."""
    default_steps: int = 20
    """The sampling steps the exported pipeline defaults to: model.pretrained's (50 for
    the released 1024 px model), else 20."""


def build_components(cfg: Config, accelerator=None, dataset=None) -> Components:
    """The pipeline's components from the model config; ``dataset`` (the manifest's
    ``LCUManifest``, if already read) spares ``words`` a second read."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    from ace import testing
    from ace.models import ACETransformer

    m = cfg.model
    if m.pretrained:
        from ace.pipeline import ACEPipeline

        pipe = ACEPipeline.from_pretrained(m.pretrained)
        unused = unused_model_keys(m, dict(pipe.transformer.config))
        if unused:
            warnings.warn(
                f"model.pretrained={m.pretrained} gives every component, so {'; '.join(unused)} "
                "are not used (drop them, or model.pretrained to build from them)",
                stacklevel=3,
            )
        text_encoder = frozen_dtype(pipe.text_encoder, m.text_encoder_dtype)
        return Components(
            pipe.tokenizer, text_encoder, pipe.vae, pipe.transformer,
            pipe.indicators.table.detach().clone(), pipe.config.default_steps,
        )  # fmt: skip
    check_model_dirs(cfg)
    if m.text_encoder == "tiny":
        tokenizer, text_encoder = testing.tiny_text_encoder()
    elif m.text_encoder == "words":
        tokenizer, text_encoder = manifest_word_encoder(cfg, accelerator, dataset)
    else:
        tokenizer = AutoTokenizer.from_pretrained(m.text_encoder, local_files_only=True)
        text_encoder = T5EncoderModel.from_pretrained(m.text_encoder, local_files_only=True)
    text_encoder = frozen_dtype(text_encoder, m.text_encoder_dtype)
    vae = (
        testing.tiny_vae()
        if m.vae == "tiny"
        else AutoencoderKL.from_pretrained(m.vae, local_files_only=True)
    )
    overrides = {"text_dim": text_encoder.config.d_model, **m.overrides}
    try:
        transformer = ACETransformer.from_preset(m.preset, **overrides)
    except ValueError as e:
        raise ValueError(
            f"model.preset={m.preset}, model.overrides={dict(m.overrides)}: {e}"
        ) from e
    if transformer.config.text_dim != text_encoder.config.d_model:  # a matmul error at step 1
        raise ValueError(
            f"model.overrides.text_dim={transformer.config.text_dim}, but the text encoder "
            f"makes {text_encoder.config.d_model}-dim states; drop the override (the "
            "encoder's width is the default)"
        )
    latent, reads = vae.config.latent_channels, transformer.config.in_channels
    if latent != reads:  # a shape error at the first step otherwise
        raise ValueError(
            f"model.preset={m.preset} reads {reads} latent channels but the VAE "
            f"({m.vae}) makes {latent}; pick a matching VAE, or model.overrides.in_channels="
            f"{latent}"
        )
    return Components(tokenizer, text_encoder, vae, transformer)


def unused_model_keys(m, pretrained: dict) -> list[str]:
    """The model keys set against model.pretrained, whose pipeline gives the components:
    a preset (with its overrides) that describes another transformer than the pretrained
    one, and any text encoder, VAE or toy VAE training asked for."""
    from ace.models import PRESETS

    unused = []
    want = {**PRESETS.get(m.preset, {}), **m.overrides}
    differ = sorted(k for k, v in want.items() if k in pretrained and pretrained[k] != v)
    if differ:
        theirs = ", ".join(f"{k}={pretrained[k]}" for k in differ)
        unused.append(f"model.preset={m.preset} and model.overrides (the pretrained {theirs})")
    for key, default in (("text_encoder", "tiny"), ("vae", "tiny"), ("vae_toy_steps", 0)):
        if getattr(m, key) != default:
            unused.append(f"model.{key}={getattr(m, key)}")
    return unused


def frozen_dtype(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """``module`` cast to the dtype ``name`` of ``ace.device.DTYPES`` ("auto": as it is)."""
    from ace.device import DTYPES

    return module if name == "auto" else module.to(DTYPES[name])


def manifest_word_encoder(cfg: Config, accelerator=None, dataset=None):
    """``model.text_encoder=words``: the word-level encoder (``ace.train.word_encoder``)
    fitted on every instruction of ``data.manifest`` (made first if it is a toy split)."""
    from ace.conditioning import clean_text
    from ace.train.word_encoder import word_text_encoder

    if not cfg.data.manifest:
        raise ValueError(
            "model.text_encoder=words fits its vocabulary on the instructions of "
            "data.manifest; set data.manifest (shards alone are not read ahead)"
        )
    if dataset is None:
        dataset = build_dataset(cfg.data, accelerator)
    texts = [clean_text(t["instruction"]) for r in dataset.records for t in r["turns"]]
    return word_text_encoder(texts, seed=cfg.train.seed)


FIXED_ON_RESUME = ("model.preset", "model.overrides", "objective.", "optim.lr", "optim.betas",
                   "optim.eps", "optim.weight_decay", "ema.", "train.grad_accum", "train.seed",
                   "data.batch_size", "data.max_tokens", "data.max_seq_len")  # fmt: skip
"""Config keys (or prefixes) a resumed run must share with the run it continues: they
shape the weights and the optimizer state, which the checkpoint restores as they were, or
the data position (a step reads micro-batches step * grad_accum ..., each of batch_size
samples or max_tokens tokens per process, in the epoch order train.seed draws, each
sample resized to data.max_seq_len: another value would skip or repeat samples).
Paths (model.vae, data.manifest ...) may move, and train.max_steps may grow (the learning
rate then follows the new schedule from the first resumed step)."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_optimizer(
    params, o: OptimConfig, mixed_precision: str, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with ``optim``'s settings; fused on a CPU or CUDA ``device`` unless
    ``optim.fused`` is off or the run is fp16 (``OptimConfig.fused`` says why)."""
    fused = o.fused and mixed_precision != "fp16" and fused_adamw(device)
    return torch.optim.AdamW(
        params,
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=fused or None,  # None: torch's default (foreach on a GPU, a loop on CPU)
    )


def check_resumable(cfg: Config, saved: Path) -> None:
    """ValueError naming every ``FIXED_ON_RESUME`` key where ``cfg`` differs from the
    config the checkpoint's run wrote (``saved``; nothing to check if it is absent)."""
    if not saved.is_file():
        return
    old = _flat(json.loads(saved.read_text()))
    new = _flat(json.loads(json.dumps(to_dict(cfg))))  # as written: tuples become lists
    changed = [
        f"{k}={old.get(k)!r} there, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if k.startswith(FIXED_ON_RESUME) and old.get(k) != new.get(k)
    ]
    if changed:
        raise ValueError(
            f"train.resume: the checkpoint was trained with other settings ({'; '.join(changed)}); "
            "resume with the same ones, or start a new train.output_dir"
        )


def drop_rows_after(metrics: Path, step: int) -> None:
    """Keep the rows of ``metrics`` up to ``step`` (atomically): a run that crashed after its
    last checkpoint logged steps the resumed run is about to log again, and perhaps half a
    row, which goes too."""
    if not metrics.is_file():
        return

    def logged_by_then(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    lines = metrics.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.endswith("\n") and logged_by_then(line)]
    if len(keep) < len(lines):
        atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(keep)))


def check_output_dir(cfg: Config) -> None:
    """ValueError before any work: ``train.output_dir`` must be a directory (or creatable
    as one), and one that already holds a run (checkpoints or metrics.jsonl) only with
    ``train.resume``: a fresh run there would mix its rows, checkpoints and config with the
    old run's, and a later resume could load the old run's optimizer state."""
    out = Path(cfg.train.output_dir)
    parent = nearest_existing(out)
    if not parent.is_dir():
        raise ValueError(f"train.output_dir {out}: {parent} is a file, not a directory")
    if os.environ.get("RANK", "0") != "0":  # torchrun sets RANK: the main process alone
        return  # checks what is there (and stops the others by failing)
    check_free(out)
    if cfg.train.resume is None and out.is_dir():
        # an empty metrics.jsonl is a run that failed before its first step (an error or
        # an out-of-memory at step 1): nothing of it is lost by starting again
        logged = out / "metrics.jsonl"
        held = sorted(p.name for p in out.iterdir() if CHECKPOINT.match(p.name))
        if logged.is_file() and logged.stat().st_size > 0:
            held.append(logged.name)
        if held and not any(CHECKPOINT.match(h) for h in held):  # it stopped before one
            raise ValueError(
                f"train.output_dir {out} holds a run that stopped before its first checkpoint "
                "(metrics.jsonl, no checkpoint-*): nothing to resume; delete that directory, "
                "or give a new train.output_dir"
            )
        if held:
            raise ValueError(
                f"train.output_dir {out} already holds a run ({', '.join(held[:3])}); continue "
                "it with train.resume=latest, or give a new (or emptied) train.output_dir"
            )


@contextmanager
def full_weights_on_every_rank():
    """Load with FSDP's RAM-efficient loading off. accelerate launch sets it from the FSDP
    files (fsdp_cpu_ram_efficient_loading), and transformers 4.x then leaves every rank
    but the first with uninitialised weights, for FSDP to broadcast: T5 is frozen and never
    wrapped, so nothing would, and those ranks would encode text from garbage."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def keep_float_inputs(fsdp_plugin) -> None:
    """FSDP's mixed precision casts the forward's float inputs to its param_dtype by
    default (FSDP1: the root's; FSDP2: every sharded module's): under bf16 the timesteps
    were rounded (999 became 1000, spacing 4 past 512), which neither DDP's autocast nor
    the sampler does. The model casts its tokens and texts to its own dtype itself, so the
    cast is turned off."""
    from torch.distributed.fsdp import MixedPrecision  # FSDP2's class moved in torch 2.6

    policy = getattr(fsdp_plugin, "mixed_precision_policy", None)
    if isinstance(policy, MixedPrecision):  # FSDP1
        policy.cast_root_forward_inputs = False
    elif dataclasses.is_dataclass(policy) and hasattr(policy, "cast_forward_inputs"):
        # FSDP2's MixedPrecisionPolicy, which is frozen
        fsdp_plugin.mixed_precision_policy = dataclasses.replace(policy, cast_forward_inputs=False)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        cpu = not torch.cuda.is_available()
        check_output_dir(cfg)
        if cpu and t.mixed_precision == "fp16":
            raise ValueError(
                "train.mixed_precision=fp16 needs a CUDA GPU (on the CPU it would silently run "
                "in float32); use bf16 or no"
            )
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.grad_accum,
            # the LR schedule is written in optimizer steps: by default accelerate would step
            # it once per process on every optimizer step (world_size times too fast)
            step_scheduler_with_optimizer=False,
            log_with=list(t.trackers) or None,
            project_dir=str(Path(t.output_dir) / "logs"),
        )
        self.fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        check_model_dirs(cfg)  # before minutes of toy VAE training, then again after it
        ensure_vae(cfg, self.accelerator)
        set_seed(t.seed)
        self.out = Path(t.output_dir)
        check_model_dirs(cfg)
        # the manifest is read once, here, for the word encoder and the batches alike
        dataset = (
            build_dataset(cfg.data, self.accelerator)
            if cfg.data.manifest and not cfg.data.shards
            else None
        )
        main = self.accelerator.is_main_process  # the one that writes and checks it
        self.data_digest = records_digest(dataset) if dataset is not None and main else None
        with full_weights_on_every_rank():
            parts = build_components(cfg, self.accelerator, dataset)
        tokenizer, text_encoder, vae, transformer = parts[:4]
        self.tokenizer, self.default_steps = tokenizer, parts.default_steps
        device = self.accelerator.device
        self.conditioner = ConditionTokenizer(tokenizer, text_encoder.to(device), vae.to(device))
        with torch.no_grad():  # the image indicator embeddings: fixed, as T5 is frozen
            table = parts.indicators
            if table is None:
                table = self.conditioner.indicator_table()
            self.indicators = table.to(device)  # (10, E)
        self.objective = config_objective(cfg)
        token_px = self.conditioner.vae_factor * transformer.config.patch_size  # 16, or 8 (toy)
        budget = resize_budget(
            transformer.config.rope_max_len,
            self.conditioner.vae_factor,
            transformer.config.patch_size,
        )
        if (cfg.data.max_seq_len or 0) > budget:  # step 1's error, after any cache build
            raise ValueError(
                f"data.max_seq_len={cfg.data.max_seq_len} resizes images past the model's "
                f"rope_max_len={transformer.config.rope_max_len} tokens of {token_px} px: "
                f"at most {budget} (or null, which is {budget})"
            )
        self.max_seq_len = cfg.data.max_seq_len or budget
        self.batches = make_batches(
            cfg.data, self.accelerator, t.seed, self.max_seq_len, dataset, patch_pixels=token_px
        )
        costs = getattr(self.batches, "costs", None)  # token-budget mode: they pack the epochs
        self.costs_digest = costs_digest(costs) if costs is not None else None
        if cfg.data.cache:  # read T5 states and VAE posteriors instead of running the encoders
            from ace.train.cache import build_cache

            self.batches.items = build_cache(
                self.batches.dataset,
                self.conditioner,
                cfg.data.cache,
                self.max_seq_len,
                cfg.data.cache_shard_size,
                self.accelerator,
            )
            # their work is in the cache now (and the indicator table above): off the
            # accelerator, where the released T5-XXL would hold 19 GB for nothing
            self.conditioner.text_encoder.to("cpu")
            self.conditioner.vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        transformer.set_attention_backend(cfg.model.attention_backend)
        if cfg.model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        o = cfg.optim
        optimizer = build_optimizer(transformer.parameters(), o, t.mixed_precision, device)
        warmup = max(o.warmup_steps, 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_factor, warmup=warmup, decay=o.decay, total=t.max_steps)
        )
        if self.fsdp:
            keep_float_inputs(self.accelerator.state.fsdp_plugin)
        self.model, self.optimizer, self.schedule = self.accelerator.prepare(
            transformer, optimizer, schedule
        )
        self.ema = None
        if cfg.ema.enabled:
            # of this rank's shard under FSDP (ace/train/ema.py): self.model's parameters
            # are every parameter FSDP manages, whatever its use_orig_params
            self.ema = EMAModel(self.model.parameters(), decay=cfg.ema.decay)
            self.ema.to(device)
            if not self.fsdp:  # the main process saves it; under FSDP each rank its shard
                self.accelerator.register_for_checkpointing(self.ema)
        if hasattr(self.batches, "state_dict"):  # a stream: its position goes into every checkpoint
            self.accelerator.register_for_checkpointing(self.batches)
        self.step = 0
        self.nonfinite = 0
        # samples every rank skipped: up to the resumed checkpoint, and since (from the
        # step's all-reduce, against this rank's count when the run or the resume began)
        self.skipped_before, self.skipped_since, self._skipped_here = 0, 0, 0
        self.unloaded = 0  # micro-batches in a row with a rank that loaded none of its batch
        self.window_finite = True  # no non-finite loss since the last optimizer step
        self.window_samples = 0.0  # samples of the window so far, every rank's

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------ one step

    def forward_loss(self, step: int) -> tuple[torch.Tensor, int, int]:
        """This rank's loss on micro-batch ``step``, its image tokens and its samples (0 when
        every sample failed to load: the loss is then a stand-in's times zero)."""
        cfg, acc = self.cfg, self.accelerator
        g = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, acc.process_index))
        lcus = self.batches.take(step)
        loaded = bool(lcus)
        if not loaded:
            if not hasattr(self.batches, "stand_in"):
                raise ValueError(f"step {step}: every sample of this rank's batch failed to load")
            lcus = self.batches.stand_in()
        model = self.unwrapped
        batch = encode_batch(
            lcus,
            self.conditioner,
            model,
            self.max_seq_len,
            cfg.data.cond_dropout,
            g,
            acc.device,
            model.dtype,
        )
        indicators = self.indicators

        def model_fn(x_t, t):
            tokens = noisy_tokens(batch, x_t, model.config.patch_size)
            return self.model(
                tokens, batch.text, t.to(acc.device), batch.packed, indicators
            ).float()

        loss = self.objective.loss(
            model_fn, batch.x0, batch.packed.target_sample, batch.num_samples, generator=g
        )
        if not loaded:
            return loss * 0.0, 0, 0
        return loss, batch.num_tokens, batch.num_samples

    def micro_step(self, index: int) -> tuple[float, float, float, bool]:
        """Forward and backward of micro-batch ``index``; the optimizer steps at the end of
        each accumulation window whose every micro-batch had a finite loss on every rank.
        Returns the loss summed over the samples, the tokens and the samples, each over the
        ranks, whether every rank's loss was finite and whether every rank loaded its batch."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.model):
            loss, tokens, samples = self.forward_loss(index)
            # backward runs whatever the loss, so that the step's one host sync (below) comes
            # after forward and backward are queued, not between them; a non-finite loss
            # only makes non-finite gradients, which the skip below throws away. Weighted by
            # the micro-batch's samples (a full fixed-size batch: 1), and the window's
            # gradient rescaled below, every sample of the window counts the same however
            # token budgets, failed loads and ranks split it
            acc.backward(loss * (samples / cfg.data.batch_size))
            # one small all-reduce per step: the loss summed over samples for the log, the
            # batch size, and whether EVERY rank's loss is finite (all ranks must skip a step
            # together)
            loss = loss.detach().float() * samples
            n_tokens, n_samples = loss.new_full((), tokens), loss.new_full((), samples)
            loaded = loss.new_full((), float(samples > 0))
            skipped = loss.new_full((), float(self.batches.skipped - self._skipped_here))
            stats = [loss, n_tokens, n_samples, torch.isfinite(loss).float(), loaded, skipped]
            stats = torch.stack(stats)
            if acc.num_processes > 1:
                stats = acc.reduce(stats, reduction="sum")
            loss_sum, tokens, samples, n_finite, n_loaded, skipped = stats.tolist()  # one sync
            self.skipped_since = int(skipped)
            finite = int(n_finite) == acc.num_processes
            # a rank whose whole batch failed to load ran a stand-in: nobody steps on it
            loaded = int(n_loaded) == acc.num_processes
            # with gradient accumulation, one skipped micro-batch spoils its whole window
            self.window_finite = self.window_finite and finite and loaded
            self.window_samples += samples
            stepped = acc.sync_gradients and self.window_finite
            if stepped:
                # accelerate averaged the window's micro-batches and DDP its ranks: make it
                # the mean over the window's samples (a no-op when every batch was full)
                scale = cfg.data.batch_size * cfg.train.grad_accum * acc.num_processes
                scale /= max(self.window_samples, 1)
                if scale != 1.0:
                    for p in self.model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(scale)
                # clipped only on a step that is taken: with fp16, clipping unscales the
                # gradients, and a skipped step would leave the GradScaler's round open
                if cfg.optim.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                if not self.optimizer.step_was_skipped:  # fp16's GradScaler may skip it
                    self.schedule.step()
            if acc.sync_gradients:
                self.window_finite, self.window_samples = True, 0.0
            self.optimizer.zero_grad(set_to_none=True)
        self.unloaded = 0 if loaded else self.unloaded + 1
        if self.unloaded >= cfg.train.max_nonfinite:
            raise ValueError(
                f"{self.unloaded} micro-batches in a row at step {self.step} had a rank whose "
                "every sample failed to load (see the warnings): is the data there?"
            )
        # the average follows the steps taken: not one fp16's GradScaler skipped, which
        # would only advance its warm-up counter
        if stepped and not self.optimizer.step_was_skipped and self.ema is not None:
            self.ema.step(self.model.parameters())
        return loss_sum, tokens, samples, finite, loaded

    @property
    def skipped_total(self) -> int:
        """Samples skipped by every rank since step 0 (the metrics' ``skipped_samples``)."""
        return self.skipped_before + self.skipped_since

    def train_step(self) -> dict:
        """One optimizer step: ``train.grad_accum`` micro-batches (numbered from
        ``step * grad_accum``, so a resumed run draws the same ones); returns its log row."""
        acc, accum = self.accelerator, self.cfg.train.grad_accum
        start = time.perf_counter()
        lr = self.schedule.get_last_lr()[0]  # the rate this step uses (the schedule steps after)
        parts = [self.micro_step(self.step * accum + k) for k in range(accum)]
        finite = all(p[3] for p in parts)
        # counted in optimizer steps: a window with a non-finite micro-batch skips its step
        self.nonfinite = 0 if finite else self.nonfinite + 1
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            raise TrainingStopped(
                f"{self.nonfinite} steps in a row with a non-finite loss at step {self.step}: "
                "stopping (lower optim.lr, or use train.mixed_precision=bf16 instead of fp16)"
            )
        self.step += 1
        seconds = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": sum(p[0] for p in parts) / max(sum(p[2] for p in parts), 1),  # per sample
            "lr": lr,
            "tokens": int(sum(p[1] for p in parts)),
            "samples/s": sum(p[2] for p in parts) / seconds,
            "world_size": acc.num_processes,
            "skipped_step": not all(p[3] and p[4] for p in parts),
            "skipped_samples": self.skipped_total,
        }

    # ------------------------------------------------------------------------ the loop

    def train(self) -> Path:
        """Train to ``train.max_steps`` and export; returns OUTPUT/pipeline. The main process
        holds OUTPUT/.lock meanwhile: a second run in the same directory is refused."""
        self.out.mkdir(parents=True, exist_ok=True)
        with run_lock(self.out) if self.accelerator.is_main_process else nullcontext():
            return self._train()

    def _train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:  # what an interrupted save or export left half-written
            for stale in [*self.out.glob(".tmp-checkpoint-*"), self.out / ".tmp-pipeline"]:
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        if cfg.train.resume:
            self.resume(cfg.train.resume)
            if self.step >= cfg.train.max_steps:
                warnings.warn(
                    f"the checkpoint is at step {self.step}, train.max_steps is "
                    f"{cfg.train.max_steps}: nothing to train; exporting the checkpoint's weights",
                    stacklevel=2,
                )
        if acc.is_main_process:
            self.write_config(self.out)
        if cfg.train.trackers:
            acc.init_trackers("ace", config={"lr": cfg.optim.lr, "batch_size": cfg.data.batch_size})
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.step,
            disable=not acc.is_local_main_process,
            desc="train",
        )
        metrics = (self.out / "metrics.jsonl").open("a") if acc.is_main_process else None
        try:
            while self.step < cfg.train.max_steps:
                row = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    if metrics:  # a skipped non-finite loss is null: NaN is not JSON
                        loss = row["loss"] if math.isfinite(row["loss"]) else None
                        metrics.write(json.dumps({**row, "loss": loss}) + "\n")
                        metrics.flush()
                    if cfg.train.trackers:
                        acc.log(
                            {k: float(v) for k, v in row.items() if k != "step"}, step=self.step
                        )
                if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if metrics:
                metrics.close()
            if cfg.train.trackers:
                acc.end_training()
        self.check_ranks_in_sync()
        return self.export()

    def check_ranks_in_sync(self) -> bool | None:
        """Every rank's weight checksum, written to OUTPUT/ranks.json: DDP must keep them equal.
        Under FSDP each rank sums its own shard, so the sums differ by design: in_sync is
        then null (None), not false."""
        acc = self.accelerator
        with torch.no_grad():
            local = torch.stack([local_part(p).double().sum() for p in self.model.parameters()])
            local = local.sum()
        sums = acc.gather(local.reshape(1).to(acc.device)).tolist()
        in_sync = len(set(sums)) == 1
        if self.fsdp:
            in_sync = None
        if acc.is_main_process:
            (self.out / "ranks.json").write_text(
                json.dumps({"checksums": sums, "in_sync": in_sync})
            )
        return in_sync

    # ------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """accelerate save_state into a temporary directory, renamed into place when complete."""
        acc = self.accelerator
        final = self.out / f"checkpoint-{self.step}"
        tmp = self.out / f".tmp-checkpoint-{self.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        skipped = self.skipped_at_position()
        acc.save_state(str(tmp))
        if self.fsdp and self.ema is not None:
            save_ema_shard(self.ema, tmp, acc.process_index)
        acc.wait_for_everyone()  # every rank's files (random_states_{rank}) are in tmp
        if acc.is_main_process:
            self.write_config(tmp)  # the checkpoint's own: what a resume is checked against
            state = {"step": self.step, "nonfinite": self.nonfinite, "skipped": skipped}
            state["tokenizer"] = tokenizer_digest(self.conditioner.tokenizer)
            state["vae"] = vae_digest(self.conditioner.vae)
            state["world_size"] = acc.num_processes
            state["data"] = self.data_digest  # the manifest's records (shards: None; the
            # stream refuses a resume on other shard names itself)
            state["costs"] = self.costs_digest
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            fsync_tree(tmp)  # on disk before its name says it is complete
            self._remove_checkpoint(self.step)
            os.replace(tmp, final)
            fsync_dir(self.out)
            others = sorted(s for s in self.checkpoints() if s != self.step)
            for old in others[: max(0, len(others) - (self.cfg.train.keep_last - 1))]:
                self._remove_checkpoint(old)
        acc.wait_for_everyone()
        return final

    def _remove_checkpoint(self, step: int) -> None:
        """Delete ``checkpoint-{step}`` if present: renamed to a temporary name first (which
        the next run's start clears), so a kill mid-delete leaves no half checkpoint that
        ``resume=latest`` would pick."""
        final = self.out / f"checkpoint-{step}"
        if final.exists():
            doomed = self.out / f".tmp-checkpoint-del-{step}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def skipped_at_position(self) -> int:
        """``skipped_total`` as of the data position a checkpoint saves now (one all-reduce;
        every rank calls it): what a resume must start from, since it reads the samples past
        that position again, and counts those it skips again."""
        own = self.batches.position_skipped() - self._skipped_here
        total = torch.tensor(float(own), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return self.skipped_before + int(total.item())

    def write_config(self, directory: Path) -> None:
        """The run's config as ``directory/config.json`` (the run's, and each checkpoint's)."""
        (directory / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))

    def checkpoints(self) -> list[int]:
        if not self.out.is_dir():
            return []
        steps = [int(m[1]) for p in self.out.iterdir() if (m := CHECKPOINT.match(p.name))]
        return [s for s in steps if (self.out / f"checkpoint-{s}" / "trainer_state.json").is_file()]

    def resume(self, where: str) -> None:
        if where == "latest":
            steps = self.checkpoints()
            if not steps:
                raise ValueError(f"train.resume=latest but {self.out} holds no complete checkpoint")
            path = self.out / f"checkpoint-{max(steps)}"
        else:
            path = Path(where)
            if not (path / "trainer_state.json").is_file():
                raise ValueError(f"train.resume: {path} is not a complete checkpoint directory")
        own = path / "config.json"  # the run's config, saved with its checkpoint
        check_resumable(self.cfg, own if own.is_file() else path.parent / "config.json")
        state = json.loads((path / "trainer_state.json").read_text())
        tok = self.conditioner.tokenizer
        digests = (tokenizer_digest(tok), tokenizer_digest(tok, legacy=True))
        if state.get("tokenizer", digests[0]) not in digests:  # text_encoder=words refits every run
            raise ValueError(
                f"train.resume: {path} was trained with another tokenizer vocabulary than this "
                "run's (the same words can get other ids); resume with the code and data it "
                "was trained with"
            )
        then = state.get("vae")  # checkpoints before this check hold none
        if then is not None and then != vae_digest(self.conditioner.vae):
            raise ValueError(
                f"train.resume: {path} was trained on another VAE's latents than this run's "
                f"model.vae ({self.cfg.model.vae}: its encoder weights or scaling factor "
                "differ), so the model would go on in another latent space; resume with the "
                "VAE it was trained with, or start a new train.output_dir"
            )
        world = state.get("world_size", self.accelerator.num_processes)
        if world != self.accelerator.num_processes:  # the global batch, hence the position
            raise ValueError(
                f"train.resume: {path} was trained on {world} processes, this run has "
                f"{self.accelerator.num_processes}; resume on {world}, or start a new "
                "train.output_dir"
            )
        then = state.get("data")
        if then is not None and self.data_digest is not None and then != self.data_digest:
            warnings.warn(  # extending a dataset is legitimate; only exactness is lost
                f"train.resume: the manifest differs from the one {path} was trained "
                f"on ({then.split(':')[0]} records then, {self.data_digest.split(':')[0]} now): "
                "the resumed run will not see the samples an uninterrupted run would have",
                stacklevel=2,
            )
        then = state.get("costs")
        if then is not None and self.costs_digest is not None and then != self.costs_digest:
            warnings.warn(  # e.g. a file unreadable now that was read then, or the reverse
                f"train.resume: the records' token costs differ from those {path} was trained "
                f"on ({then.split(':')[0]} record(s) left out then, "
                f"{self.costs_digest.split(':')[0]} now): data.max_tokens packs every epoch "
                "from them, so the resumed run will not see the batches an uninterrupted run "
                "would have",
                stacklevel=2,
            )
        if self.fsdp:
            self._materialise_optimizer_state()
        self.accelerator.load_state(str(path))
        if self.ema is not None and self.fsdp:
            load_ema_shard(self.ema, path, self.accelerator.process_index)
        elif self.ema is not None:  # accelerate loads custom states onto the CPU
            self.ema.to(self.accelerator.device)
        self._follow_schedule()
        self._keep_implementation()
        self.step, self.nonfinite = state["step"], state["nonfinite"]
        self.skipped_before, self.skipped_since = state.get("skipped", 0), 0
        self._skipped_here = self.batches.skipped  # this rank's, as restored (streams keep theirs)
        # a run that trains on from here abandons what was logged and saved after it; one
        # past train.max_steps only exports (and must leave the later work alone)
        if self.accelerator.is_main_process and self.step < self.cfg.train.max_steps:
            drop_rows_after(self.out / "metrics.jsonl", self.step)
            later = [s for s in self.checkpoints() if s > self.step]
            if later and path.resolve().parent == self.out.resolve():
                # an earlier checkpoint of this directory: the later ones are of the run it
                # abandons, and resume=latest must not go back to them
                warnings.warn(
                    f"train.resume: deleting the checkpoints after step {self.step} in "
                    f"{self.out} ({', '.join(f'checkpoint-{s}' for s in later)}): this run "
                    "continues from an earlier one",
                    stacklevel=2,
                )
                for s in later:
                    self._remove_checkpoint(s)
        self.accelerator.wait_for_everyone()

    def _follow_schedule(self) -> None:
        """Set the learning rate the restored schedule gives now. load_state restores the
        optimizer's rate as it was saved; with a longer train.max_steps (cosine) the first
        resumed step would run at the old schedule's rate (0 at the end of a cosine)."""
        s = getattr(self.schedule, "scheduler", self.schedule)  # past accelerate's wrapper
        for group, base, f in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
            group["lr"] = base * f(s.last_epoch)
        s._last_lr = [group["lr"] for group in s.optimizer.param_groups]

    def _keep_implementation(self) -> None:
        """Put back the AdamW implementation this run chose (``optim.fused``): load_state
        restores the checkpoint's with the other settings of its parameter groups. A fused
        group keeps its step counts in float32 on the parameter's device, as AdamW's own
        load_state_dict does for one."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # past accelerate's wrapper
        for group in opt.param_groups:
            group["fused"], group["foreach"] = opt.defaults["fused"], opt.defaults["foreach"]
            for p in group["params"] if group["fused"] else ():
                state = opt.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(p.device, torch.float32)

    def _materialise_optimizer_state(self) -> None:
        """Give AdamW its state entries with a step that changes nothing (zero gradients,
        lr 0: no update, no decay). accelerate's FSDP optimizer loading fills only the
        entries that exist, and a fresh optimizer has none: without this a resumed FSDP
        run would restart Adam's moments silently."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # past accelerate's wrapper
        lrs = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr

    def export(self) -> Path:
        """OUTPUT/pipeline: an ACEPipeline with the trained (EMA) weights and the objective's sampler."""
        from ace.pipeline import ACEPipeline, IndicatorTable

        acc = self.accelerator
        acc.wait_for_everyone()
        target = self.out / "pipeline"
        model = self.unwrapped
        if self.ema is not None:  # under FSDP into each rank's shard, gathered below
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        # every rank takes part: FSDP gathers the shards here
        state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            from ace.models import ACETransformer

            export = ACETransformer.from_config(model.config)
            export.load_state_dict(state, strict=True)
            pipe = ACEPipeline(
                export.eval(), self.conditioner.vae, self.conditioner.text_encoder, self.tokenizer,
                self.objective.make_scheduler(),
                # the table the run trained with, and model.pretrained's step count
                IndicatorTable.from_table(self.indicators.cpu()), self.default_steps,
            )  # fmt: skip
            tmp = self.out / ".tmp-pipeline"
            shutil.rmtree(tmp, ignore_errors=True)
            pipe.save_pretrained(tmp)
            fsync_tree(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            fsync_dir(self.out)
        if self.ema is not None:  # after saving: the state dict may share their storage
            self.ema.restore(self.model.parameters())
        acc.wait_for_everyone()
        return target
