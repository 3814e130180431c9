#!/usr/bin/env python
"""Time ace's DiT next to the per-sample reference (ace.reference), same weights, same batch.

For each config it first checks that both give the same prediction, then times the
forward pass (no grad), forward + backward, and one classifier-free-guidance denoise
step of one edit (ace: layout built once per sampling run, both halves in one call;
reference: its per-sample forward), as medians over --repeats runs, and
prints one table (or JSON with --json). Speeds are ratios measured side by side in the
same process, so they compare fairly on a shared machine.

Each row also gives the model FLOPs per call (torch's FlopCounterMode on the reference,
whose attention is plain matmuls; forward + backward counts 3x the forward), the share
of the matmul peak that it reaches (the peak is measured in the same run: an 8192^3 bf16
matmul on CUDA, a 2048^3 one in --dtype on CPU) and, on CUDA, each call's peak memory:
the model's own weights plus what the call allocates, so that the other model, resident
beside it, is not counted.
A call that runs out of GPU memory is reported as such (the released code needs 65 GiB
for the 8 x 512 px training batch) and the rest goes on.

    python scripts/benchmark.py                       # tiny and ace-0.6b-512, CPU
    python scripts/benchmark.py --configs tiny --repeats 20 --json
    python scripts/benchmark.py --device cuda --dtype bf16 --size 512 --batch 8 --text-len 120
    python scripts/benchmark.py --device cuda --dtype bf16 --compile   # + regional compile
    python scripts/benchmark.py --device cuda --dtype bf16 --configs ace-0.6b-512 \
        --pipeline released --size 512                # whole edit, released sizes, + offload
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from diffusers.utils import logging as diffusers_logging

from ace.cli import HelpFormatter, OneLineParser, text_table
from ace.convert import official_dit_to_ace
from ace.device import DTYPES
from ace.diffusion import apply_guidance
from ace.models import PRESETS, ACETransformer
from ace.reference import ReferenceDiT

# forward (no grad), forward + backward, and one CFG denoise step (both halves + guidance)
KINDS = ("forward", "fwd_bwd", "denoise")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--configs",
        default="tiny,ace-0.6b-512",
        help=f"comma-separated presets from {sorted(PRESETS)}",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2, help="samples per batch")
    p.add_argument("--frames", type=int, default=2, help="frames per sample (target + conditions)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    p.add_argument("--text-len", type=int, default=32, help="text tokens per frame")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--pipeline",
        nargs="?",
        const="tiny",
        choices=("tiny", "released"),
        help="also time a whole edit (T5, VAE, 20 steps): 'tiny' (the default) or 'released' "
        "sizes (random T5-XXL, SD VAE, the first --configs DiT; with model CPU offload on CUDA)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time ace with regional torch.compile (compile_repeated_blocks)",
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time the CFG denoise step replayed as a CUDA graph (CUDA only; "
        "ACEPipeline.enable_cuda_graph), checked against the plain call",
    )
    p.add_argument(
        "--pipeline-only", action="store_true", help="time only the --pipeline edit, not the DiT"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    for name in args.configs.split(","):
        if name not in PRESETS:
            p.error(f"unknown config {name!r}; choose from {sorted(PRESETS)}")
    if args.pipeline_only and not args.pipeline:
        p.error("--pipeline-only needs --pipeline")
    first = args.configs.split(",")[0]
    if args.pipeline == "released" and PRESETS[first]["text_dim"] != 4096:
        p.error(
            f"--pipeline released builds the DiT of the first --configs preset, which must "
            f"read T5-XXL (text_dim 4096): ace-0.6b-512 or ace-0.6b-1024, not {first!r}"
        )
    if args.size % 16:
        p.error(f"--size must be a multiple of 16, got {args.size}")
    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error(f"--cuda-graph needs --device cuda, got {args.device}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(fn, device, model: torch.nn.Module | None = None) -> float | None:
    """Peak CUDA memory of one call of fn, in GiB (None on other devices).

    With ``model``: what the call allocates above the memory held before it, plus the
    model's own parameters and buffers, so that another resident model (the reference
    timed beside it) is not counted. Without: the absolute peak."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    if model is None:
        return peak / 2**30
    tensors = [*model.parameters(), *model.buffers()]
    own = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")
    return (peak - before + own) / 2**30


def saved_for_backward_mib(fn, model: torch.nn.Module | None = None) -> float:
    """MiB of the tensors autograd keeps for backward after ``fn()`` (a forward with grad):
    each storage once, less ``model``'s own parameters and buffers (which are there
    anyway). The activation memory of a training step, on any device (on a GPU the peak
    adds the gradients, the optimizer state and the kernels' scratch)."""
    storages: dict[tuple, int] = {}
    own = set()
    if model is not None:
        own = {(t.device.type, t.untyped_storage().data_ptr()) for t in model.state_dict().values()}  # fmt: skip

    def pack(t):
        s = t.untyped_storage()
        key = (s.device.type, s.data_ptr())
        if key not in own:
            storages[key] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()) / 2**20


def matmul_peak_tflops(device, dtype) -> tuple[float, str]:
    """Measured matmul rate: 8192^3 bf16 on CUDA, 2048^3 in `dtype` elsewhere."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, dtype)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 3, warmup=2)
    return 2 * n**3 / (ms / 1e3) / 1e12, {v: k for k, v in DTYPES.items()}[dtype]


def counted_flops(fn) -> int:
    """FLOPs of the matmuls fn runs, counted by torch (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rel_err(outs, refs) -> float:
    """The largest relative L2 error (in fp32) of each output against its reference."""
    return max(
        ((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(outs, refs)
    )


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


def median_ms(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_batch(cfg: dict, args, device, dtype, generator):
    h = w = args.size // 8
    E = cfg["text_dim"]
    frames = [
        [
            torch.randn(cfg["in_channels"], h, w, generator=generator).to(device, dtype)
            for _ in range(args.frames)
        ]
        for _ in range(args.batch)
    ]
    masks = [[None] * args.frames for _ in range(args.batch)]
    texts = [
        [
            torch.randn(args.text_len, E, generator=generator).to(device, dtype)
            for _ in range(args.frames)
        ]
        for _ in range(args.batch)
    ]
    t = torch.randint(0, 1000, (args.batch,), generator=generator).float().to(device)
    ind = torch.randn(cfg["num_indicators"], E, generator=generator).to(device, dtype)
    return frames, masks, texts, t, ind


def bench_config(name: str, args, peak: float, peak_dtype: str) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = PRESETS[name]
    torch.manual_seed(0)
    ref = ReferenceDiT(**cfg)
    ours = ACETransformer(**cfg)
    share = cfg.get("share_qk_norm", False)
    ours.load_state_dict(official_dit_to_ace(ref.state_dict(), share_qk_norm=share), strict=True)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    inputs = make_batch(cfg, args, device, dtype, torch.Generator().manual_seed(1))

    # 1. correctness before timing
    with torch.no_grad():
        expected = ref(*inputs)

    def check(what: str) -> float:
        """ace's prediction against the reference's; SystemExit past the dtype's tolerance."""
        with torch.no_grad():
            err = rel_err(ours.predict(*inputs), expected)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        if not err <= tol:
            raise SystemExit(
                f"{name}: {what} and the reference disagree (relative error {err:.2e} > {tol:g})"
            )
        return err

    err = check("ace")

    # 2. timing
    def call(model):
        return model.predict(*inputs) if isinstance(model, ACETransformer) else model(*inputs)

    def forward(model):
        def run():
            with torch.no_grad():
                call(model)

        return run

    def train_step(model):
        def run():
            out = call(model)
            sum(o.float().square().mean() for o in out).backward()
            model.zero_grad(set_to_none=True)

        return run

    # one CFG denoise step of sample 0, as the pipeline runs it: the layout, RoPE and condition
    # tokens are built once per sampling run, then both halves go through one call
    frames, masks, texts, t, ind = inputs
    cfg_frames, cfg_masks = [frames[0]] * 2, [masks[0]] * 2
    cfg_texts = [
        texts[0],
        [texts[0][0].flip(0), *texts[0][1:]],
    ]  # the negative replaces the current text
    t2 = t[:1].repeat(2)
    packed = ours.pack(
        [[f.shape[-2:] for f in fs] for fs in cfg_frames],
        [[x.shape[0] for x in ts] for ts in cfg_texts],
    )
    tokens, text = packed.pack_frames(cfg_frames, cfg_masks), packed.pack_texts(cfg_texts)

    def denoise(model):
        def run():
            with torch.no_grad():
                if isinstance(model, ACETransformer):
                    c, u = packed.unpack_target(model(tokens, text, t2, packed, ind))
                else:
                    c, u = model(cfg_frames, cfg_masks, cfg_texts, t2, ind)
                apply_guidance(c[None], u[None], 4.5, 0.5)

        return run

    # model FLOPs per call, counted on the reference (its attention is plain matmuls)
    with torch.no_grad():
        fwd_flops = counted_flops(lambda: ref(*inputs))
        cfg_flops = counted_flops(lambda: ref(cfg_frames, cfg_masks, cfg_texts, t2, ind))
    flops = {"forward": fwd_flops, "fwd_bwd": 3 * fwd_flops, "denoise": cfg_flops}

    row = {
        "config": name,
        "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "tokens": args.batch * args.frames * (args.size // 16) ** 2,
        "rel_err": err,
        "peak_tflops": peak,
        "peak_dtype": peak_dtype,
    }

    def pct_of_peak(kind: str, ms: float | None) -> float | None:
        return None if ms is None else 100 * flops[kind] / (ms / 1e3) / (peak * 1e12)

    def speedup(kind: str, ms: float | None) -> float | None:  # over the reference
        ref_ms = row[f"{kind}_ref_ms"]
        return None if None in (ref_ms, ms) else ref_ms / ms

    makers = dict(zip(KINDS, (forward, train_step, denoise)))
    for kind, make in makers.items():
        row[f"{kind}_tflop"] = flops[kind] / 1e12
        for impl, model in (("ref", ref), ("ace", ours)):
            try:
                ms = median_ms(make(model), device, args.repeats, args.warmup)
                mem = peak_memory_gib(make(model), device, model)
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if not out_of_memory(e):
                    raise
                ms = mem = None  # reported as out of memory
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            row[f"{kind}_{impl}_ms"], row[f"{kind}_{impl}_peak_gib"] = ms, mem
            row[f"{kind}_{impl}_pct_peak"] = pct_of_peak(kind, ms)
        row[f"{kind}_speedup"] = speedup(kind, row[f"{kind}_ace_ms"])
    for impl, model in (("ref", ref), ("ace", ours)):  # activation memory, any device
        try:
            row[f"fwd_bwd_{impl}_saved_mib"] = saved_for_backward_mib(
                lambda m=model: call(m), model
            )
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            row[f"fwd_bwd_{impl}_saved_mib"] = None
            torch.cuda.empty_cache()
    if args.cuda_graph:  # the denoise step's forward as one recorded graph, before compiling
        try:
            row.update(time_cuda_graph(ours, tokens, text, t2, packed, ind, args, device))
        except Exception as e:  # a failed capture must not cost the rows above
            row["graph_error"] = f"{type(e).__name__}: {e}"[:500]
        if "denoise_graph_ms" in row:
            row["denoise_graph_pct_peak"] = pct_of_peak("denoise", row["denoise_graph_ms"])
            row["denoise_graph_speedup"] = speedup("denoise", row["denoise_graph_ms"])
    if args.compile:
        ours.compile_repeated_blocks(mode=args.compile_mode)
        for kind, make in makers.items():
            sync(device)
            start = time.perf_counter()
            make(ours)()  # the first call compiles (for this kind's shapes)
            sync(device)
            row[f"{kind}_compile_s"] = time.perf_counter() - start
            ms = median_ms(make(ours), device, args.repeats, args.warmup)
            row[f"{kind}_compiled_ms"] = ms
            row[f"{kind}_compiled_pct_peak"] = pct_of_peak(kind, ms)
            row[f"{kind}_compiled_speedup"] = speedup(kind, ms)
        # checked like the eager model; after the loop, so compile_s stays the first call's
        row["compiled_rel_err"] = check("compiled ace")
    # training throughput of the DiT step (forward + backward), image tokens of all frames
    for impl in ("ace", "ref"):
        ms = row[f"fwd_bwd_{impl}_ms"]
        row[f"train_tokens_per_s_{impl}"] = None if ms is None else row["tokens"] / (ms / 1e3)
    return row


def time_cuda_graph(model, tokens, text, t, packed, ind, args, device) -> dict:
    """The CFG denoise step with its forward replayed as a CUDA graph: its error against
    the plain call and its median ms."""
    from ace.models.cuda_graph import GraphedForward

    g = torch.Generator().manual_seed(1)
    other = (tokens + torch.randn(tokens.shape, generator=g).to(tokens), (t * 0.5).to(t.dtype))
    with torch.no_grad():
        graphed = GraphedForward(model, tokens, text, t, packed, ind)
        # replayed on inputs other than the captured ones, then on those again: a graph that
        # ignored its new inputs would pass a check on the inputs it was captured with
        err = 0.0
        for x, tt in (other, (tokens, t)):
            eager = model(x, text, tt, packed, ind)
            replayed = graphed(x, text, tt, ind).clone()
            err = max(err, rel_err([replayed], [eager]))

    def run():
        with torch.no_grad():
            c, u = packed.unpack_target(graphed(tokens, text, t, ind))
            apply_guidance(c[None], u[None], 4.5, 0.5)

    if not err <= 1e-3:  # the same kernels replayed: a larger gap is a wrong graph, not rounding
        raise ValueError(f"the replayed graph differs from the plain call (rel err {err:.1e})")
    return {
        "graph_rel_err": err,
        "denoise_graph_ms": median_ms(run, device, args.repeats, args.warmup),
    }


def bench_pipeline(args) -> dict:
    """A whole edit: T5 once, VAE encode, 20 CFG steps, VAE decode.

    ``--pipeline tiny``: ace.testing.tiny_pipeline. ``--pipeline released``: random weights
    at the released sizes (ace.testing.released_size_pipeline, the first --configs DiT) in
    --dtype; on CUDA it is timed again under ``enable_model_cpu_offload()``, with the peak
    memory of each."""
    from PIL import Image

    from ace.testing import released_size_pipeline, tiny_pipeline

    device = torch.device(args.device)
    if args.pipeline == "released":
        preset = args.configs.split(",")[0]
        pipe = released_size_pipeline(preset, device, DTYPES[args.dtype])
    else:
        preset = "tiny"
        pipe = tiny_pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (args.size, args.size), (200, 30, 30))

    def run():
        pipe(
            "make {image} blue",
            images=[image],
            num_inference_steps=20,
            generator=torch.Generator().manual_seed(0),
        )

    ms = median_ms(run, device, args.repeats, args.warmup)
    row = {
        "config": f"{args.pipeline} pipeline edit ({preset})",
        "size": args.size,
        "steps": 20,
        "ms": ms,
        "ms_per_step": ms / 20,
        "peak_gib": peak_memory_gib(run, device),
    }
    if args.pipeline == "released" and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        torch.cuda.empty_cache()
        row["offload_ms"] = median_ms(run, device, 1, 1)
        row["offload_peak_gib"] = peak_memory_gib(run, device)
    return row


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # its to(dtype) warns even with nothing to keep in fp32
    device = torch.device(args.device)
    peak, peak_dtype = matmul_peak_tflops(device, DTYPES[args.dtype])
    names = [] if args.pipeline_only else args.configs.split(",")
    rows = [bench_config(name, args, peak, peak_dtype) for name in names]
    pipeline = bench_pipeline(args) if args.pipeline else None
    meta = {
        "machine": machine(),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "batch": f"{args.batch} samples x {args.frames} frames at {args.size}px, {args.text_len} text tokens per frame",
        "command": "python scripts/benchmark.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "pipeline": pipeline}, indent=2))
        return 0
    print(report_tables({"meta": meta, "rows": rows, "pipeline": pipeline}))
    return 0


def report_tables(report: dict) -> str:
    """The plain-text tables of a ``--json`` report (also used by summarize_benchmarks.py)."""

    def num(x, fmt):
        return "OOM" if x is None else format(x, fmt)

    meta, rows, pipeline = report["meta"], report["rows"], report.get("pipeline")
    out = [f"# {meta['machine']} | torch {meta['torch']} | {meta['device']} {meta['dtype']}"]
    out[0] += f" | {meta['batch']}"
    if rows:
        out[0] += f" | {rows[0]['peak_dtype']} matmul peak {rows[0]['peak_tflops']:.1f} TFLOP/s"
        cuda = rows[0]["forward_ace_peak_gib"] is not None
        compiled = "forward_compiled_ms" in rows[0]
        heads = ["config", "call", "TFLOP", "ref ms", "ace ms", "speedup", "ref / ace % peak"]
        heads += ["ref / ace GiB"] if cuda else []
        heads += ["compiled ms", "speedup", "% peak", "compile s"] if compiled else []
        lines = []
        for r in rows:
            for k in KINDS:
                line = [r["config"], k, f"{r[f'{k}_tflop']:.3g}"]
                line += [num(r[f"{k}_ref_ms"], ".1f"), num(r[f"{k}_ace_ms"], ".1f")]
                line += [num(r[f"{k}_speedup"], ".2f") + "x"]
                pct = (num(r[f"{k}_{i}_pct_peak"], ".1f") for i in ("ref", "ace"))
                line += [" / ".join(pct)]
                if cuda:
                    gib = (num(r[f"{k}_{i}_peak_gib"], ".1f") for i in ("ref", "ace"))
                    line += [" / ".join(gib)]
                if compiled:
                    line += [f"{r[f'{k}_compiled_ms']:.1f}", num(r[f"{k}_compiled_speedup"], ".2f")]
                    line += [f"{r[f'{k}_compiled_pct_peak']:.1f}", f"{r[f'{k}_compile_s']:.1f}"]
                lines.append(line)
        out.append(text_table(heads, lines))
    for r in rows:
        if "graph_error" in r:
            out.append(f"{r['config']} denoise step as a CUDA graph failed: {r['graph_error']}")
        if "denoise_graph_ms" in r:
            out.append(
                f"{r['config']} denoise step as a CUDA graph: {r['denoise_graph_ms']:.1f} ms "
                f"against {num(r['denoise_ace_ms'], '.1f')} ms plain, "
                f"{num(r['denoise_graph_speedup'], '.2f')}x the reference, "
                f"{r['denoise_graph_pct_peak']:.1f}% of peak (rel err {r['graph_rel_err']:.1e})"
            )
        out.append(
            f"{r['config']} (rel err {r['rel_err']:.1e}, {r['params_m']}M params): training "
            f"throughput {num(r['train_tokens_per_s_ace'], '.0f')} image tokens/s "
            f"(reference {num(r['train_tokens_per_s_ref'], '.0f')}); kept for backward "
            f"{num(r['fwd_bwd_ace_saved_mib'], '.0f')} MiB "
            f"(reference {num(r['fwd_bwd_ref_saved_mib'], '.0f')})"
        )
    if pipeline:
        out.append(
            f"{pipeline['config']} at {pipeline['size']} px, {pipeline['steps']} steps: "
            f"{pipeline['ms']:.0f} ms ({pipeline['ms_per_step']:.1f} ms per step, T5 + VAE included)"
        )
        if pipeline["peak_gib"] is not None:
            out.append(f"  peak memory {pipeline['peak_gib']:.2f} GiB")
        if "offload_ms" in pipeline:
            out.append(
                f"  with enable_model_cpu_offload(): {pipeline['offload_ms']:.0f} ms, "
                f"peak memory {pipeline['offload_peak_gib']:.2f} GiB"
            )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
