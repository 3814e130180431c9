"""Training configuration: dataclasses are the schema, YAML files and ``key=value`` override.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=8", "optim.lr=1e-4"])

Unknown keys and wrong types are errors that name the key (OmegaConf structured
configs), raised as ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """ACETransformer preset: "tiny", "toy" (the CPU demo's), "ace-0.6b-512", "ace-0.6b-1024"."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ACETransformer arguments over the preset, e.g. {depth: 4}."""
    pretrained: str | None = None
    """An ACEPipeline directory to start from (all components, e.g. converted released weights)."""
    text_encoder: str = "tiny"
    """"tiny" (a random byte-level T5, for tests), "words" (a random T5 over the words of
    data.manifest's instructions, ace.train.word_encoder: the CPU demo's) or a local T5
    directory."""
    text_encoder_dtype: str = "auto"
    """The frozen text encoder's dtype: auto (as loaded or made; a release converted by
    convert_official.py is bf16 by default), fp32, bf16 or fp16. The released model encodes
    in bf16; a T5-XXL saved in float32 otherwise holds 19 GB on every process and runs in
    float32 (train.mixed_precision covers the transformer only)."""
    vae: str = "tiny"
    """"tiny" (random), or a local diffusers AutoencoderKL directory."""
    vae_toy_steps: int = 0
    """If > 0 and model.vae is a directory that does not exist yet: first train the toy VAE
    (ace.train.vae) there for this many steps on toy-world images."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    attention_backend: str = "auto"
    """auto, sdpa, varlen, flex or dense."""


@dataclass
class ObjectiveConfig:
    name: str = "ddpm-eps"
    """ddpm-eps (released) or rectified-flow."""
    shift: float = 1.0
    """Rectified flow: timestep shift (SD3); larger = noisier."""


@dataclass
class DataConfig:
    manifest: str = ""
    """A JSONL manifest (docs/DATA.md) or its directory."""
    toy_n: int = 0
    """If > 0 and the manifest is absent: generate this many toy LCUs there first."""
    toy_seed: int = 0
    """Seed of the generated toy split."""
    toy_size: int = 64
    """Side of the generated toy images."""
    toy_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight of a toy task in the generated split, by name (``ace.data.toy.TASKS``);
    the tasks not named keep ``ace.data.toy.DEFAULT_WEIGHTS``. Used only when the split is
    made."""
    batch_size: int = 8
    """LCUs per batch and process (with max_tokens: at most this many)."""
    max_tokens: int = 0
    """If > 0: fill each batch of each process up to this many image tokens (all frames),
    no padding, instead of a fixed number of LCUs. A token is one DiT patch: 16 px square
    for the released VAE, 8 px for the toy VAE."""
    shards: str = ""
    """WebDataset shards to stream instead of the manifest: a path, brace pattern or pipe: URL."""
    shuffle_buffer: int = 0
    """Shards: the sample shuffle buffer (0 = the written order)."""
    num_workers: int = 0
    """Shards: DataLoader workers that read and decode. Workers take strict turns, so with
    shuffle_buffer 0 a worker that holds fewer samples (fewer shards, or a short last
    shard) has its samples come up in inverse proportion: 3 equal shards on 2 workers read
    the lone shard of one worker about 1.8 times as often as each of the other's (and the
    same holds across ranks). Give every rank x worker the same number of shards, or set
    shuffle_buffer > 1, which also shuffles the shards every epoch and evens it out."""
    max_seq_len: int | None = None
    """Resize budget per image in 16 px squares, as the released resize counts (released:
    1024 at 512 px); default: what fits the model's rope_max_len tokens (the same for the
    released geometry, 64 for the toy VAE's 8 px tokens: 128 px)."""
    cond_dropout: float = 0.1
    """Probability of training an LCU on classifier-free guidance's unconditional texts: ""
    for the target and the last frame, as the sampler's unconditional half reads them
    (``ace.request.unconditional_texts``)."""
    cache: str | None = None
    """A directory for the embedding cache (ace.train.cache): T5 states and VAE posteriors of
    the manifest, built there on first use and read instead of running the encoders."""
    cache_shard_size: int = 1024
    """LCUs per embedding-cache shard."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """AdamW learning rate (released: 1e-5)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-10
    """AdamW eps (released: 1e-10)."""
    weight_decay: float = 5e-4
    """AdamW weight decay (released: 5e-4)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    decay: str = "constant"
    """After warm-up: "constant" (released) or "cosine" (to 0 at train.max_steps)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    fused: bool = True
    """torch's fused AdamW on a CPU or CUDA GPU: one kernel for every parameter. On a CPU
    torch's default is a loop over the parameters; fused, a step of the demo's DiT took 7%
    less on 2 cores (BENCHMARKS.md, session 18). false: torch's default (on a GPU,
    foreach). Not with ``train.mixed_precision=fp16``: the GradScaler calls a fused step
    even when it skips it, and accelerate would count a skipped step as taken. A resumed
    run uses its own setting, whatever the checkpoint's run used."""


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average; the exported weights are then the EMA weights."""
    decay: float = 0.9999
    """EMA decay, in [0, 1). diffusers' EMAModel uses 0 at its first update (a copy of the
    weights) and min(decay, n / (9 + n)) at the n-th after (2/11, 3/12, ...), so early on
    the average follows the weights closely."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    output_dir: str = "outputs/run"
    """Where checkpoints, metrics.jsonl and pipeline/ go. A directory that already holds a
    run is refused unless ``resume`` continues it."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end)."""
    keep_last: int = 3
    """Keep the last K checkpoints."""
    resume: str | None = None
    """A checkpoint directory, or "latest" in output_dir."""
    seed: int = 0
    """Seed for weights, data order and noise."""
    mixed_precision: str = "no"
    """no, bf16 or fp16 (fp16 needs a CUDA GPU)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; max_steps, checkpoint_every and log_every count
    optimizer steps."""
    log_every: int = 1
    """Write a metrics.jsonl row every N steps."""
    max_nonfinite: int = 5
    """Stop after this many optimizer steps in a row skipped for a non-finite loss (with
    gradient accumulation, one non-finite micro-batch skips its whole window), or this many
    micro-batches in a row where some rank could load none of its samples (skipped too)."""
    trackers: list[str] = field(default_factory=list)
    """accelerate trackers fed with every logged row, e.g. [tensorboard] (logs in output_dir/logs)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """The defaults, then the YAML file, then ``key=value`` overrides; unknown keys are errors."""
    import yaml

    def bad(e: OmegaConfBaseException, where: str) -> ValueError:
        key = getattr(e, "full_key", None)
        first = str(e).splitlines()[0]
        return ValueError(f"bad config {where}: {first}" + (f" (key: {key})" if key else ""))

    cfg = OmegaConf.structured(Config)
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as e:
            raise ValueError(
                f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
            ) from e
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"config file {path} must hold a mapping of sections, not a list")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise bad(e, f"in {path}") from e
    wrong = [o for o in overrides if "=" not in o]
    if wrong:
        raise ValueError(f"overrides must look like key=value, got {wrong}")
    for override in overrides:  # one at a time, so that an error names its override
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise bad(e, f"override {override!r}") from e
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise bad(e, "") from e
    _check(out)
    return out


def _check(cfg: Config) -> None:
    t, d = cfg.train, cfg.data
    for name, value in (
        ("train.max_steps", t.max_steps),
        ("data.batch_size", d.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.log_every", t.log_every),
        ("train.keep_last", t.keep_last),
        ("train.max_nonfinite", t.max_nonfinite),
        ("data.cache_shard_size", d.cache_shard_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if t.resume is not None and not t.resume.strip():  # it would start over, not continue
        raise ValueError(
            f"train.resume must be latest, a checkpoint directory or null, got {t.resume!r}"
        )
    if t.seed >= 2**32:  # accelerate's set_seed seeds numpy too
        raise ValueError(f"train.seed must be < 2**32, got {t.seed}")
    if not 0 <= d.toy_seed < 2**32:  # one word of the toy world's seed sequence
        raise ValueError(f"data.toy_seed must lie in [0, 2**32), got {d.toy_seed}")
    check_trackers(t.trackers)
    if t.mixed_precision == "False":  # YAML 1.1 reads a bare no (or off, false) as False
        t.mixed_precision = "no"
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(
            f"train.mixed_precision must be no, bf16 or fp16, got {t.mixed_precision!r}"
        )
    o, e = cfg.optim, cfg.ema
    for name, value in (
        ("optim.lr", o.lr),
        ("optim.eps", o.eps),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    for name, value in (
        ("optim.weight_decay", o.weight_decay),
        ("optim.warmup_steps", o.warmup_steps),
        ("optim.grad_clip", o.grad_clip),
        ("train.seed", t.seed),
        ("data.num_workers", d.num_workers),
        ("data.shuffle_buffer", d.shuffle_buffer),
    ):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    if not 0 <= e.decay < 1:
        raise ValueError(f"ema.decay must be in [0, 1), got {e.decay}")
    if d.max_seq_len is not None and d.max_seq_len < 1:
        raise ValueError(f"data.max_seq_len must be >= 1 or null, got {d.max_seq_len}")
    if not 0 <= d.cond_dropout < 1:
        raise ValueError(f"data.cond_dropout must be in [0, 1), got {d.cond_dropout}")
    if not d.manifest and not d.shards:
        raise ValueError("set data.manifest (a JSONL manifest or its directory) or data.shards")
    if d.max_tokens < 0:
        raise ValueError(f"data.max_tokens must be >= 0, got {d.max_tokens}")
    for name, value in (
        ("optim.lr", o.lr),
        ("optim.eps", o.eps),
        ("optim.weight_decay", o.weight_decay),
        ("optim.grad_clip", o.grad_clip),
        ("objective.shift", cfg.objective.shift),
    ):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not cfg.objective.shift > 0:
        raise ValueError(f"objective.shift must be > 0, got {cfg.objective.shift}")
    # checked here, not after the toy VAE, the data and the embedding cache are made
    from ace.data.toy import DEFAULT_WEIGHTS, TASKS, check_size
    from ace.device import DTYPES
    from ace.diffusion import OBJECTIVES
    from ace.models.attention import BACKENDS

    if cfg.objective.name not in OBJECTIVES:
        raise ValueError(
            f"objective.name must be one of {', '.join(OBJECTIVES)}, got {cfg.objective.name!r}"
        )
    from ace.models import PRESETS, ACETransformer

    if cfg.model.preset not in PRESETS:
        raise ValueError(
            f"model.preset must be one of {', '.join(PRESETS)}, got {cfg.model.preset!r}"
        )
    unknown = ACETransformer.unknown_arguments(cfg.model.overrides)
    if unknown:
        raise ValueError(
            f"model.overrides: unknown ACETransformer argument(s) {unknown}; "
            f"known: {sorted(ACETransformer.arguments())}"
        )
    if cfg.model.attention_backend not in BACKENDS:
        raise ValueError(
            f"model.attention_backend must be one of {', '.join(BACKENDS)}, "
            f"got {cfg.model.attention_backend!r}"
        )
    if cfg.model.text_encoder_dtype not in ("auto", *DTYPES):
        raise ValueError(
            f"model.text_encoder_dtype must be one of auto, {', '.join(DTYPES)}, "
            f"got {cfg.model.text_encoder_dtype!r}"
        )
    if cfg.optim.decay not in ("constant", "cosine"):
        raise ValueError(f"optim.decay must be constant or cosine, got {cfg.optim.decay!r}")
    try:  # before minutes of toy VAE training at it, not when the data is made
        check_size(d.toy_size)
    except ValueError as e:
        raise ValueError(f"data.toy_size: {e}") from None
    for task, weight in d.toy_weights.items():
        if task not in TASKS:
            raise ValueError(
                f"data.toy_weights: unknown task {task!r}; known tasks: {', '.join(TASKS)}"
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"data.toy_weights.{task} must be finite and >= 0, got {weight}")
    if not sum({**DEFAULT_WEIGHTS, **d.toy_weights}.values()) > 0:
        raise ValueError("data.toy_weights: every task has weight 0; give one a weight > 0")
    if cfg.model.vae_toy_steps < 0:
        raise ValueError(f"model.vae_toy_steps must be >= 0, got {cfg.model.vae_toy_steps}")
    if d.cache and d.shards:
        raise ValueError(
            "data.cache caches a manifest; it cannot be combined with data.shards "
            "(streamed shards are encoded on the fly)"
        )


def check_trackers(trackers: list[str]) -> None:
    """Each of train.trackers is one accelerate knows and is installed: accelerate itself
    drops a missing one with a warning, and the run would log nowhere."""
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in trackers:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"train.trackers: unknown tracker {name!r}; accelerate's are "
                f"{', '.join(LOGGER_TYPE_TO_CLASS)}"
            )
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise ValueError(f"train.trackers: {name} is not installed (pip install {name})")


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
