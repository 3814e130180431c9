"""ACEPipeline: instructions and images in, images out, every task through one LCU.

Shapes: C latent channels, (H, W) pixel size, (h, w) = (H/8, W/8) latent size,
E text dim, K = 10 indicator rows, B samples: 2 a request under CFG (conditional,
unconditional), one without.

    from ace.testing import tiny_pipeline
    pipe = tiny_pipeline()
    image = pipe("a red circle", height=64, width=64, num_inference_steps=4).images[0]

    chat = pipe.chat(height=64, width=64, num_inference_steps=4)
    first = chat("a red circle")
    second = chat("make {image} blue")   # {image} is the previous output

    # many requests, a batch of them in each transformer call
    out = pipe.generate([{"instruction": "a red circle"}, {"instruction": "a star"}])

The call runs in numbered steps: 1. check inputs (build the LCU), 2. preprocess
images and masks, 3. encode (T5 once, VAE once, masks), 4. prepare the target
latents, 5. pack once, 6. denoise (both CFG halves in one transformer call per step),
7. decode. ``generate`` runs steps 2-4 request by request, then 5-7 for a batch of them.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ace.conditioning import (
    MAX_TEXT_TOKENS,
    ConditionTokenizer,
    clean_text,
    downsample_mask,
    postprocess,
    resize_budget,
    to_numpy,
    vae_factor_of,
)
from ace.ddim import for_sampling
from ace.diffusion import apply_guidance
from ace.lcu import LCU, ConditionUnit, as_history
from ace.models.cuda_graph import GraphCache, GraphedForward, layout_key

# diffusers loads a component only from a module that is already imported
from ace.models.transformer import ACETransformer  # noqa: F401
from ace.packing import PackedBatch, patchify
from ace.request import (  # noqa: F401 (public here too)
    INPAINTING_TASKS,
    PreparedLCU,
    check_inpainting_masks,
    check_inputs,
    check_size,
    check_target_size,
    is_int,
    largest_square,
    lcu_request,
    prepare_lcu,
    unconditional_texts,
)
from ace.warn import warn_caller

if TYPE_CHECKING:
    from ace.chat import ChatSession


class IndicatorTable(ModelMixin, ConfigMixin):
    """The raw image-indicator table: T5 states of ``{image}`` ... ``{image9}`` (first token).

    Computed once from the text encoder and stored with the pipeline.
    """

    @register_to_config
    def __init__(self, num_indicators: int = 10, text_dim: int = 4096):
        super().__init__()
        self.register_buffer("table", torch.zeros(num_indicators, text_dim))

    @classmethod
    def from_table(cls, table: Tensor) -> IndicatorTable:
        module = cls(*table.shape)
        module.table.copy_(table.float())
        return module


class ACEPipeline(DiffusionPipeline):
    """ACE: create and edit images from instructions.

    Components: ``transformer`` (ACETransformer), ``vae`` (AutoencoderKL),
    ``text_encoder`` (T5EncoderModel), ``tokenizer``, ``scheduler`` (DDIM for the
    released epsilon models, FlowMatchEuler for rectified-flow models), and
    ``indicators`` (the indicator table; computed from the text encoder when omitted).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ("indicators",)
    max_cuda_graphs = 8
    """Captured layouts kept by ``enable_cuda_graph()`` (each holds its own GPU memory); a
    new layout beyond these drops the least recently used one."""

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        indicators=None,
        default_steps: int = 20,
    ):
        super().__init__()
        if indicators is None:
            table = ConditionTokenizer(tokenizer, text_encoder, vae).indicator_table()
            indicators = IndicatorTable.from_table(table)
        self.register_modules(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            indicators=indicators,
        )
        # the released step count (20 at 512 px, 50 at 1024 px): used by infer.py and chat()
        self.register_to_config(default_steps=default_steps)

    @property
    def conditioner(self) -> ConditionTokenizer:
        # inputs go to the execution device: under enable_model_cpu_offload() the
        # components sit on the CPU until their hooks move them
        return ConditionTokenizer(
            self.tokenizer, self.text_encoder, self.vae, device=self._execution_device
        )

    @property
    def max_seq_len(self) -> int:
        """The resize budget (``conditioning.resize_budget``): images are scaled down to fit
        the DiT's ``rope_max_len`` tokens, whatever its VAE's factor."""
        cfg = self.transformer.config
        return resize_budget(cfg.rope_max_len, vae_factor_of(self.vae.config), cfg.patch_size)

    @staticmethod
    def max_seq_len_of(path: str | os.PathLike) -> int:
        """``max_seq_len`` of the saved pipeline at ``path``, from its configs alone (no
        weights load), so a request's size can be checked first."""
        t = json.loads((Path(path) / "transformer" / "config.json").read_text())
        v = json.loads((Path(path) / "vae" / "config.json").read_text())
        return resize_budget(t["rope_max_len"], vae_factor_of(v), t["patch_size"])

    @property
    def default_size(self) -> int:
        """The square text-to-image side that fills the token budget: 512 px for the 512px model."""
        return largest_square(self.max_seq_len)

    @staticmethod
    def build_lcu(instruction: str, images=None, masks=None, history=None, task: str = "") -> LCU:
        """The LCU of a request; ``history`` is a list of ConditionUnits or dicts with the
        same fields (instruction, and optional images, masks). Needs no weights, so a
        request can be checked before the pipeline loads."""
        return LCU(
            current=ConditionUnit(instruction, [] if images is None else images, masks),
            history=as_history(history),
            task=task,
        )

    def enable_cuda_graph(self) -> None:
        """Replay the transformer's forward as a CUDA graph during sampling.

        The first call of each layout (image sizes, number of inputs, text lengths) records
        the forward once, after two warm-up passes; every denoising step of that call and of
        later calls with the same layout then replays it with one launch. Worth it where a
        step is bound by kernel launches (small images, small batches); the images are the
        same as without. Needs the pipeline on a CUDA device and not under
        ``enable_model_cpu_offload()`` (a graph keeps the weights' addresses). A moved,
        replaced or re-typed transformer, or another attention backend, records anew;
        calling it again drops every recorded graph.
        """
        self._cuda_graphs: GraphCache | None = GraphCache(self.max_cuda_graphs)

    def disable_cuda_graph(self) -> None:
        """Back to plain calls; frees the recorded graphs."""
        self._cuda_graphs = None

    def _graphed(
        self,
        tokens: Tensor,
        text: Tensor,
        timesteps: Tensor,
        packed: PackedBatch,
        indicators: Tensor,
    ) -> GraphedForward:
        """The recorded forward for this layout, recording it on first use."""
        if tokens.device.type != "cuda":
            raise ValueError(
                f"enable_cuda_graph(): the pipeline runs on {tokens.device}; CUDA graphs need "
                "a CUDA device (pipe.to('cuda')), or call pipe.disable_cuda_graph()"
            )
        model = self.transformer
        weight = next(model.parameters())
        if getattr(self, "_all_hooks", None) or weight.device.type != "cuda":
            raise ValueError(
                "enable_cuda_graph() does not work with enable_model_cpu_offload() or "
                "sequential offload: the weights move between calls and a graph keeps their "
                "addresses"
            )
        # a graph holds addresses, not tensors: a moved, replaced or re-typed model, or
        # another attention backend, must record anew
        model_key = (id(model), weight.data_ptr(), weight.dtype, model.attention_backend)
        # the timesteps' dtype too: DDIM's are int64, flow's float32, and a graph recorded
        # for one would copy the other into its buffer truncated
        key = (layout_key(packed), tokens.dtype, timesteps.dtype, tokens.device, model_key)
        return self._cuda_graphs.get(
            key, lambda: GraphedForward(model, tokens, text, timesteps, packed, indicators)
        )

    def chat(self, **defaults) -> ChatSession:
        """A multi-turn session: each turn's inputs go into the history of the next."""
        from ace.chat import ChatSession

        return ChatSession(self, **defaults)

    @torch.no_grad()
    def __call__(
        self,
        instruction: str,
        images=None,
        masks=None,
        history=None,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        guidance_rescale: float = 0.5,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        task: str = "",
    ) -> ImagePipelineOutput:
        """Create or edit one image.

        Args:
            instruction: the current instruction; names its images ``{image}``, ``{image1}``...
            images: a list of input images (RGB PIL, or float tensors (3, H, W) in [0, 1]).
            masks: a list of one mask or None per image; white = the region to edit (PIL
                "L" or integer 0-255: > 128, as released; 0/1 when the maximum is 1, which
                the released rule reads as empty; bool; float in [0, 1]).
            history: a list of earlier turns, oldest first (ConditionUnits or dicts with
                keys instruction, images, masks, task). Kept without ``images`` too: its
                images are frames and the first sets the default size; the released code
                ignores the history of a request without images (pass none for that).
            negative_prompt: the unconditional half's text for the target and the last
                input image (released: it replaces the last entry of the per-image prompt
                list); other images keep their instructions.
            height, width: target size in pixels (ints, multiples of 16), both or neither.
                Default: the size of the request's first image (oldest turn first, so a
                history image wins over the current ones, as in the released code) after
                preprocessing, or a square that fills the token budget.
            num_inference_steps, guidance_scale, guidance_rescale: the sampler settings
                (released: 20 / 4.5 / 0.5 at 512 px). A scale <= 1 samples the conditional
                prediction alone; the released code then feeds the negative prompt's states
                under the instruction's text mask, a quirk not reproduced.
            generator: for the initial noise and for the input images' latents (drawn from
                the VAE posterior, as released): an edit given ``latents`` but no generator
                still varies from call to call.
            latents: the initial noise of the target, (1, C, H/8, W/8), scaled latent space.
            output_type: "pil", "np" (float arrays in [0, 1]) or "latent".
            task: ``"inpainting"`` sets the masked pixels of the inputs to -1 first, as the
                released inpainting requests do (an image whose mask is None is then a
                reference, left whole); otherwise masks only mark the region.
        """
        # 1. check inputs
        check_inputs(
            num_inference_steps, height, width, guidance_scale, guidance_rescale, output_type
        )
        self._check_steps(num_inference_steps)
        request = dict(
            instruction=instruction, images=images, masks=masks, history=history, task=task,
            negative_prompt=negative_prompt, height=height, width=width, latents=latents,
        )  # fmt: skip
        lcu = self._check_request(request, self.max_seq_len)
        (generator,) = _generators(generator, 1)  # a list of one is the one
        # 2-4. preprocess, encode, initial noise
        conditioner = self.conditioner
        steps, cfg = int(num_inference_steps), guidance_scale > 1.0
        scheduler = for_sampling(self.scheduler)  # its copy: DDIM stepping to its next timestep
        state = self._prepare(lcu, request, steps, cfg, generator, scheduler, conditioner)
        # 5-6. pack and denoise
        self._denoise([state], guidance_scale, guidance_rescale, conditioner.device, graphs=True)
        # 7. decode
        return self._decode([state], output_type, conditioner, single=True)

    @torch.no_grad()
    def generate(
        self,
        requests,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        guidance_rescale: float = 0.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        batch_size: int = 8,
    ) -> ImagePipelineOutput:
        """Create or edit many images: ``batch_size`` requests share each transformer call.

        ``requests`` is a list of requests, each an ``LCU`` (its current instruction, images,
        masks, history and task) or a dict of ``__call__``'s per-request arguments:
        ``instruction`` (required), ``images``, ``masks``, ``history``, ``task``,
        ``negative_prompt``, ``height``, ``width`` and ``latents``. The sampler settings are
        shared. ``generator``: a list of one per request, one for all, or None. With a list,
        request i gives the image ``pipe(**request_i, generator=g[i])`` gives, up to float
        rounding (the batched matrix products sum in another order). One generator for all
        is drawn request after request, as calls one after another would draw it, only
        where the scheduler's step draws nothing (DDIM, FlowMatchEuler as configured here);
        a step that draws noise draws for every request of a batch in turn. Returns
        ``.images`` with one entry per request, in order: PIL images, (H, W, 3) float arrays
        ("np"), or (1, C, h, w) target latents ("latent").

            from ace.testing import tiny_pipeline
            pipe = tiny_pipeline()
            out = pipe.generate(
                [{"instruction": "a red circle"}, {"instruction": "a blue square"}],
                num_inference_steps=4,
            )
            len(out.images)  # 2

        Each batch packs every request's frames (both guidance halves) into one token
        stream, so a step costs one transformer call however many requests it holds; where
        a single request's call is bound by per-operation overhead (small images, a CPU) the
        batch is faster per image (BENCHMARKS.md). Its activations grow with it: at the
        released sizes, mind the GPU's memory. ``enable_cuda_graph()`` applies to
        ``__call__`` only (mixed requests make a new layout nearly every batch, and each
        recorded graph keeps memory for its whole batch).
        """
        # 1. check inputs
        check_inputs(num_inference_steps, None, None, guidance_scale, guidance_rescale, output_type)
        self._check_steps(num_inference_steps)
        if isinstance(requests, (dict, LCU)) or not isinstance(requests, (list, tuple)):
            raise ValueError(
                f"requests: expected a list of LCUs or dicts, got {type(requests).__name__}"
            )
        if not requests:
            raise ValueError("requests: the list is empty")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        generators = _generators(generator, len(requests))
        checked, max_seq_len = [], self.max_seq_len
        for i, request in enumerate(requests):
            request = _request_dict(request, i)
            try:
                checked.append((self._check_request(request, max_seq_len), request))
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from e
        conditioner, steps, cfg = self.conditioner, int(num_inference_steps), guidance_scale > 1.0
        images = []
        for start in range(0, len(checked), batch_size):
            # 2-4. preprocess, encode, initial noise: request by request, each drawing from
            # its own generator in the order a single call draws
            states = []
            for k, (lcu, request) in enumerate(checked[start : start + batch_size]):
                # a copy of the pipeline's scheduler (its settings, set_shift included)
                scheduler = for_sampling(self.scheduler)
                try:
                    states.append(
                        self._prepare(
                            lcu, request, steps, cfg, generators[start + k], scheduler, conditioner
                        )
                    )
                except ValueError as e:
                    raise ValueError(f"request {start + k}: {e}") from e
            # 5-6. pack and denoise, the whole batch in each transformer call
            self._denoise(
                states, guidance_scale, guidance_rescale, conditioner.device, graphs=False
            )
            # 7. decode
            images += self._decode(states, output_type, conditioner, single=False).images
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------ the call's steps

    def _check_steps(self, num_inference_steps: int) -> None:
        """Step 1: a DDIM schedule spaces its steps over the training timesteps, so it has
        at most that many (diffusers would say so after T5 and the VAE have run)."""
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            if self.scheduler.config.get("use_dynamic_shifting"):
                raise ValueError(
                    "the scheduler has use_dynamic_shifting=True, which needs a shift (mu) per "
                    "image size that ACE does not define; load it with "
                    "use_dynamic_shifting=False and a fixed shift (set_shift)"
                )
            return  # its sigmas are given, any number of them
        total = self.scheduler.config.get("num_train_timesteps")
        if total is not None and num_inference_steps > total:
            raise ValueError(
                f"num_inference_steps={num_inference_steps}, but the scheduler has "
                f"{total} training timesteps: at most {total}"
            )

    def _check_request(self, request: dict, max_seq_len: int) -> LCU:
        """Step 1 for one request: its size, negative prompt and task; returns its LCU."""
        height, width = request.get("height"), request.get("width")
        check_target_size(height, width)
        check_size(height, width, max_seq_len)
        negative_prompt, task = request.get("negative_prompt", ""), request.get("task", "")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt: expected a str, got {negative_prompt!r}")
        if "inpaint" in str(task).lower() and task not in INPAINTING_TASKS:
            warn_caller(  # other tags are labels; toy ones (recolor ...) are passed too
                f"task={task!r} is not an inpainting tag {INPAINTING_TASKS}: the masked pixels "
                "are not filled; pass task='inpainting' for that"
            )
        lcu = self.build_lcu(
            request["instruction"],
            request.get("images"),
            request.get("masks"),
            request.get("history"),
            task,
        )
        limit = MAX_TEXT_TOKENS
        for i, cu in enumerate(lcu.turns):
            where = "instruction" if cu is lcu.current else f"history[{i}]"
            n = len(self.tokenizer(clean_text(cu.instruction)).input_ids)
            if n > limit:  # the released encoder pads and truncates to 120 tokens
                warn_caller(
                    f"{where} is {n} tokens long; the text encoder reads the first {limit} "
                    "(what follows is ignored)"
                )
        check_inpainting_masks(lcu)
        return lcu

    def _prepare(
        self,
        lcu: LCU,
        request: dict,
        num_inference_steps: int,
        cfg: bool,
        generator: torch.Generator | None,
        scheduler,
        conditioner: ConditionTokenizer,
    ) -> _Sampling:
        """Steps 2-4 for one request: preprocess, encode, the target's initial noise.
        ``conditioner`` is the call's ``self.conditioner``, which carries its device."""
        device, dtype = conditioner.device, self.transformer.dtype
        height, width = request.get("height"), request.get("width")
        negative_prompt = request.get("negative_prompt", "")

        # 2. preprocess images and masks
        size = None
        if height is not None:
            size = (int(height), int(width))
        elif not lcu.images:
            size = (self.default_size, self.default_size)
        prepared = prepare_lcu(lcu, self.max_seq_len, size)
        f = conditioner.vae_factor  # 8 for the released VAE
        h, w = prepared.target_size[0] // f, prepared.target_size[1] // f

        # 3. encode: T5 once for every instruction (and the negative prompt), VAE once
        turns = lcu.instructions()
        states = conditioner.encode_text([*turns, negative_prompt] if cfg else turns)
        frame_turns = lcu.frame_turns()
        texts = [[states[i] for i in frame_turns]]
        if cfg:  # the negative prompt for the target and the last frame (released)
            texts.append(unconditional_texts(texts[0], states[-1]))
        cond_latents = (
            conditioner.encode_images(prepared.images, generator=generator)
            if prepared.images
            else []
        )
        cond_masks = [downsample_mask(m, f) for m in prepared.masks]
        target_mask = downsample_mask(prepared.target_mask, f).to(device, dtype)  # (1, h, w)

        # 4. prepare the target's initial noise
        C = self.transformer.config.in_channels
        shape = (1, C, h, w)
        latents = request.get("latents")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif not isinstance(latents, torch.Tensor):
            raise ValueError(
                f"latents: expected a torch tensor {shape}, got {type(latents).__name__}"
            )
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents shape {tuple(latents.shape)}, expected {shape} for a {h * f}x{w * f} target"
            )
        # the scheduler's arithmetic stays on the CPU, on python numbers: with its timesteps on
        # the GPU, each step would index CPU tables with GPU scalars (a host sync each time)
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            # sigmas from 1 to 1/n, shifted once by the scheduler, as in training (and Flux)
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
            scheduler.set_timesteps(sigmas=sigmas, device="cpu")
        else:
            scheduler.set_timesteps(num_inference_steps, device="cpu")
        # DDIM scales the initial noise by 1, flow matching has no such factor; a scheduler
        # whose factor follows its schedule (Euler's) has it only once the schedule is set
        latents = latents.to(device, torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
        return _Sampling(
            texts=texts,
            frames=[x.to(device, dtype) for x in cond_latents],
            masks=[m.to(device, dtype) for m in cond_masks],
            target_mask=target_mask,
            latents=latents,
            scheduler=scheduler,
            generator=generator,
        )

    def _denoise(
        self,
        states: list[_Sampling],
        guidance_scale: float,
        rescale: float,
        device: torch.device,
        graphs: bool,
    ) -> None:
        """Steps 5-6: pack every request's samples (its conditional and, under guidance, its
        unconditional half) into one stream once, then denoise; each state's ``latents``
        ends as its final target latent. ``graphs``: replay recorded CUDA graphs where
        ``enable_cuda_graph()`` asks for them."""
        dtype = self.transformer.dtype
        cfg = guidance_scale > 1.0

        # 5. pack once: positions, RoPE, layouts and the condition tokens are reused every step
        halves = len(states[0].texts)  # samples per request: 2 under guidance, else 1
        frames, fmasks, texts = [], [], []
        for s in states:
            target = s.latents[0].to(dtype)  # a placeholder: each step writes its tokens
            frames += [[target, *s.frames]] * halves
            fmasks += [[s.target_mask, *s.masks]] * halves
            texts += s.texts
        n_samples = len(texts)
        packed = self.transformer.pack(
            [[tuple(f.shape[-2:]) for f in fs] for fs in frames],
            [[t.shape[0] for t in ts] for ts in texts],
            device=device,
        )
        tokens = packed.pack_frames(frames, fmasks)  # (T, (C+1)*p*p)
        text = packed.pack_texts([[t.to(device) for t in ts] for ts in texts])  # (Tt, E)
        indicators = self.indicators.table.to(device, dtype)  # (K, E)
        p = self.transformer.config.patch_size

        # 6. denoise: no host sync inside a step (the timesteps go to the device once)
        schedule = states[0].scheduler.timesteps  # (S,) on the CPU, the same for every state
        model_timesteps = schedule.to(device)[:, None].expand(-1, n_samples)  # (S, B)
        graphed = None  # with enable_cuda_graph(): the recorded forward of this layout
        if graphs and getattr(self, "_cuda_graphs", None) is not None:
            graphed = self._graphed(tokens, text, model_timesteps[0], packed, indicators)
        for i, t in enumerate(self.progress_bar(schedule.tolist())):
            targets = []
            for s in states:
                x_t = (
                    s.scheduler.scale_model_input(s.latents, t)
                    if hasattr(s.scheduler, "scale_model_input")
                    else s.latents
                )
                target = patchify(torch.cat([x_t[0].to(dtype), s.target_mask]), p)  # (n, D)
                targets.append(target.repeat(halves, 1))
            tokens = tokens.index_copy(0, packed.target_index, torch.cat(targets))
            timesteps = model_timesteps[i]  # (B,)
            out = (
                graphed(tokens, text, timesteps, indicators)
                if graphed is not None
                else self.transformer(tokens, text, timesteps, packed, indicators)
            )  # (T0, p*p*C)
            preds = packed.unpack_target(out)  # B x (C, h, w)
            for k, s in enumerate(states):
                mine = preds[k * halves : (k + 1) * halves]  # this request's samples
                pair = torch.stack(mine).float()  # (halves, C, h, w)
                pred = apply_guidance(pair[:1], pair[1:], guidance_scale, rescale) if cfg else pair
                s.latents = s.scheduler.step(pred, t, s.latents, **s.step_kwargs).prev_sample

    def _decode(
        self,
        states: list[_Sampling],
        output_type: str,
        conditioner: ConditionTokenizer,
        single: bool,
    ):
        """Step 7: the VAE decodes the final latents, those of one size in shared calls;
        one call's output holds what ``__call__`` returns, a batch's one entry per request."""
        if output_type == "latent":
            self.maybe_free_model_hooks()
            if single:
                return ImagePipelineOutput(images=states[0].latents)
            return ImagePipelineOutput(images=[s.latents for s in states])
        # equal-size latents share VAE calls
        pixels = conditioner.decode_each([s.latents.to(self.vae.dtype) for s in states])
        images = [postprocess(x) if output_type == "pil" else to_numpy(x) for x in pixels]
        self.maybe_free_model_hooks()  # after the decode: the VAE goes back to the CPU too
        if single:
            return ImagePipelineOutput(images=images[0])
        return ImagePipelineOutput(images=[x[0] for x in images])


@dataclass
class _Sampling:
    """One request between steps 4 and 7: what its denoising reads and updates."""

    texts: list[list[Tensor]]  # per sample (conditional, unconditional) its per-frame states
    frames: list[Tensor]  # the condition latents (C, h, w), on the device
    masks: list[Tensor]  # their latent masks (1, h, w)
    target_mask: Tensor  # (1, h, w)
    latents: Tensor  # (1, C, h, w) float32: the initial noise, then the denoised target
    scheduler: object  # its own: a scheduler keeps the index of its step
    generator: torch.Generator | None

    @functools.cached_property
    def step_kwargs(self) -> dict:
        """The generator, for a scheduler whose ``step`` takes one (PNDM's does not; one
        that passes ``**kwargs`` on, as ``ScheduleDDIMScheduler``'s, does); read once, not
        at every step."""
        params = inspect.signature(self.scheduler.step).parameters.values()
        takes = any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)
        return {"generator": self.generator} if takes else {}


REQUEST_KEYS = (
    "instruction", "images", "masks", "history", "task", "negative_prompt", "height", "width",
    "latents",
)  # fmt: skip
"""What a request of ``ACEPipeline.generate`` may hold (``__call__``'s per-request arguments)."""


def _request_dict(request, index: int) -> dict:
    """A request of ``generate`` as a dict of ``REQUEST_KEYS``; ValueError naming a bad one."""
    if isinstance(request, LCU):
        return lcu_request(request)
    if not isinstance(request, dict):
        raise ValueError(
            f"request {index}: expected an LCU or a dict, got {type(request).__name__}"
        )
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"request {index}: unknown key(s) {unknown}; known: {list(REQUEST_KEYS)}")
    if "instruction" not in request:
        raise ValueError(f"request {index}: no instruction")
    return request


def _generators(generator, n: int) -> list:
    """One generator (or None) per request: a list of n as it is, one shared by all."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"generator: got a list of {len(generator)} for {n} requests")
        for i, g in enumerate(generator):
            if g is not None and not isinstance(g, torch.Generator):
                raise ValueError(
                    f"generator[{i}]: expected a torch.Generator or None, got {type(g).__name__}"
                )
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator: expected a torch.Generator, a list of them or None, got "
            f"{type(generator).__name__}"
        )
    return [generator] * n
