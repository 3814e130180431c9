"""Training on CPU: exact resume, real 2-process DDP, overfitting, crash safety, bad input."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ace.data.manifest import write_manifest
from ace.data.toy import TASKS
from ace.lcu import LCU, ConditionUnit
from ace.pipeline import ACEPipeline
from ace.train import Trainer, load_config
from ace.train.config import OptimConfig
from ace.train.trainer import TrainingStopped, build_optimizer
from tests._scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"  # the plumbing config: seconds per run
TOY = ROOT / "configs" / "toy.yaml"  # the demo's config, made tiny by overrides
TINY_TOY = ["model.preset=tiny", "model.vae=tiny", "data.cache=", "train.log_every=1"]


# torchrun's CPU runs hide any GPU: on a CUDA machine accelerate would pick NCCL and put
# both ranks on cuda:0
def cpu_only() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def solid_lcus(n):
    """Small LCUs made by hand: text-to-image and one-image edits of solid colours."""
    for i in range(n):
        a = Image.new("RGB", (64, 64), COLORS[i % 4])
        b = Image.new("RGB", (64, 64), COLORS[(i + 1) % 4])
        if i % 2:
            yield LCU(ConditionUnit("make {image} the next colour", [a]), target=b, task="recolor")
        else:
            yield LCU(
                ConditionUnit(f"a plain colour number {i % 4}"), target=a, task="text_to_image"
            )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "set"
    write_manifest(solid_lcus(16), root, progress=False)
    return root


def args(data, out, steps, *extra):
    return [
        f"data.manifest={data}", f"train.output_dir={out}", f"train.max_steps={steps}",
        "train.checkpoint_every=5", "data.batch_size=4", *extra,
    ]  # fmt: skip


def losses(out):
    return [
        json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
    ]


def weights(out):
    return load_file(Path(out) / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_resume_is_exact(data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(load_config(CONFIG, args(data, straight, 8))).train()
    Trainer(load_config(CONFIG, args(data, split, 5))).train()
    Trainer(load_config(CONFIG, [*args(data, split, 8), "train.resume=latest"])).train()
    assert losses(straight) == losses(split)  # bitwise: 8 rows each
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[0]["world_size"] == 1
    assert {"loss", "lr", "tokens", "samples/s", "world_size"} <= rows[0].keys()
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-8"]
    pipe = ACEPipeline.from_pretrained(straight / "pipeline")  # the export loads and runs
    assert pipe("a plain colour number 1", height=64, width=64, num_inference_steps=2).images[
        0
    ].size == (64, 64)


def test_the_seed_decides_the_run(data, tmp_path):
    """The same seed repeats a run bitwise (what exact resume rests on); another seed draws
    other batches, noise and timesteps, so other losses from the first step."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        Trainer(load_config(CONFIG, args(data, tmp_path / name, 2, f"train.seed={seed}"))).train()
        runs[name] = losses(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert all(x != y for x, y in zip(runs["a"], runs["c"])), runs


def test_a_resume_runs_the_adamw_of_its_own_config(data, tmp_path):
    """load_state restores the checkpoint's param-group settings, optim.fused's among them:
    a run resumed with another optim.fused ran the checkpoint's AdamW; it now runs its own,
    and stays within rounding of a run that never switched."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(load_config(CONFIG, args(data, straight, 7))).train()
    Trainer(load_config(CONFIG, args(data, split, 5, "optim.fused=false"))).train()
    for fused, steps in (("true", 6), ("false", 7)):
        trainer = Trainer(load_config(CONFIG, [*args(data, split, steps, f"optim.fused={fused}"), "train.resume=latest"]))  # fmt: skip
        opt = trainer.optimizer.optimizer
        trainer.train()
        assert all(bool(g["fused"]) == (fused == "true") for g in opt.param_groups)
        steps_now = [s["step"] for s in opt.state.values()]
        assert steps_now and all(s.dtype == torch.float32 and int(s) == steps for s in steps_now)
    a, b = weights(straight), weights(split)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_resume_from_an_earlier_checkpoint_abandons_the_later_ones(data, tmp_path):
    """Rotation kept the K highest steps: resuming 10 -> from 5 to 8 with keep_last=1
    deleted the new checkpoint-8, kept the abandoned run's checkpoint-10, and a later
    resume=latest continued the abandoned run."""
    out = tmp_path / "run"
    Trainer(load_config(CONFIG, args(data, out, 10, "train.keep_last=2"))).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    branch = [*args(data, out, 8, "train.keep_last=1"), f"train.resume={out / 'checkpoint-5'}"]
    with pytest.warns(UserWarning, match="deleting the checkpoints after step 5 .*checkpoint-10"):
        Trainer(load_config(CONFIG, branch)).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]
    trainer = Trainer(load_config(CONFIG, [*args(data, out, 9), "train.resume=latest"]))
    trainer.train()
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 10)) and not list(out.glob(".tmp-checkpoint-*"))


def test_a_longer_cosine_schedule_applies_from_the_first_resumed_step(data, tmp_path):
    """load_state restored the optimizer's saved rate: resuming a finished 6-step cosine run
    to 8 steps ran step 7 at the old schedule's final rate, 0."""
    cosine = ["optim.decay=cosine", "optim.warmup_steps=2", "train.checkpoint_every=6"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(load_config(CONFIG, args(data, straight, 8, *cosine))).train()
    Trainer(load_config(CONFIG, args(data, split, 6, *cosine))).train()
    Trainer(load_config(CONFIG, [*args(data, split, 8, *cosine), "train.resume=latest"])).train()
    lr = lambda out: [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lr(split)[6:] == lr(straight)[6:] and lr(split)[6] > 0  # steps 7 and 8


def test_data_manifest_may_be_a_file_of_any_name(data, tmp_path):
    """The validator read train.json; training looked for train.json/manifest.jsonl."""
    from ace.train.config import DataConfig
    from ace.train.data import build_dataset

    named = data / "train.json"
    shutil.copyfile(data / "manifest.jsonl", named)
    try:
        assert len(build_dataset(DataConfig(manifest=str(named)))) == 16
    finally:
        named.unlink()


def test_overfits_a_tiny_fixed_dataset(tmp_path):
    root = tmp_path / "two"
    write_manifest(list(solid_lcus(2)), root, progress=False)
    extra = ["optim.lr=2e-3", "optim.warmup_steps=0", "data.cond_dropout=0", "data.batch_size=2"]
    Trainer(
        load_config(CONFIG, args(root, tmp_path / "run", 80, *extra, "train.checkpoint_every=1000"))
    ).train()
    loss = losses(tmp_path / "run")
    first, last = np.mean(loss[:10]), np.mean(loss[-10:])
    assert first / last > 4, (first, last)


def test_two_process_ddp_on_cpu(data, tmp_path):
    """torchrun starts two real processes; accelerate picks them up (gloo on CPU). Both
    build their shards of the embedding cache, on the main process's decision."""
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        str(ROOT / "scripts" / "train.py"), "--config", str(TOY),
        *args(data, out, 4, "data.batch_size=2", *TINY_TOY, f"data.cache={cache}", "data.cache_shard_size=4"),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cpu_only())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["world_size"] == 2 for r in rows)
    # the schedule counts optimizer steps, not steps times processes (toy.yaml: lr 2e-3,
    # warm-up over 50 steps); accelerate's default would step it twice per step here. Row k
    # logs the rate step k used: lr_factor(k - 1) = k / 51
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * k / 51 for k in (1, 2, 3, 4)])
    ranks = json.loads((out / "ranks.json").read_text())
    assert len(ranks["checksums"]) == 2 and ranks["in_sync"]
    ACEPipeline.from_pretrained(out / "pipeline")
    assert json.loads((cache / "cache.json").read_text())["num_shards"] == 4
    assert sorted(p.name for p in cache.glob("shard-*")) == [f"shard-{i:05d}.safetensors" for i in range(4)]  # fmt: skip


def test_token_costs_are_the_first_ranks(data, monkeypatch):
    """Token-budget packing reads image headers for its costs: a header one rank alone
    failed to read gave that rank other batches for the whole run (samples twice, others
    never). The first rank reads them and the others take its list."""
    import torch.distributed as dist

    import ace.data.batching as batching
    from ace.train.config import DataConfig
    from ace.train.data import ManifestBatches, build_dataset

    dataset = build_dataset(DataConfig(manifest=str(data)))
    read, sent = [], {}
    real = batching.dataset_costs
    monkeypatch.setattr(batching, "dataset_costs", lambda *a, **k: read.append(1) or real(*a, **k))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)

    def broadcast(holder, src):
        assert src == 0
        if holder[0] is None:  # another rank: receives what the first sent
            holder[0] = sent["costs"]
        else:
            sent["costs"] = list(holder[0])

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    cfg = DataConfig(manifest=str(data), max_tokens=300)
    first = ManifestBatches(dataset, cfg, 0, 0, 2, 256)
    sent["costs"][5] = None  # as if rank 0 alone had failed that header: rank 1 follows
    second = ManifestBatches(dataset, cfg, 0, 1, 2, 256)
    assert len(read) == 1 and second.costs == sent["costs"] and second.costs[5] is None
    assert first.costs[5] is not None  # (what rank 0 kept before the edit above)


def test_two_nodes_of_one_process_on_one_machine(tmp_path):
    """torchrun --nnodes 2 on one machine (the README's multi-node launch, shrunk): the
    second node's process is its node's local main (LOCAL_RANK 0) but not the main process
    (RANK 1). On the shared file system the run makes its toy data and embedding cache,
    trains in step on both nodes, and leaves one set of checkpoints and one pipeline."""
    out, made = tmp_path / "out", tmp_path / "data"

    def launch(rank):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", "29533",
            str(ROOT / "scripts" / "train.py"), "--config", str(CONFIG),
            *args(made, out, 4, "data.toy_n=16", f"data.cache={tmp_path / 'cache'}",
                  "data.batch_size=2", "train.checkpoint_every=2"),
        ]  # fmt: skip
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_only()
        )

    procs = [launch(0), launch(1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert len((made / "manifest.jsonl").read_text().splitlines()) == 16
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2", "checkpoint-4",
    ]  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {r["world_size"] for r in rows} == {2}
    assert json.loads((out / "ranks.json").read_text())["in_sync"]
    ACEPipeline.from_pretrained(out / "pipeline")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP on GPUs only")
def test_fsdp_config_trains_resumes_and_exports_on_one_gpu(data, tmp_path):
    """configs/accelerate/fsdp.yaml as shipped (FSDP1, one unit per ACEBlock, sharded state
    dicts), on one process: a run, a resume from its FSDP checkpoint that must continue the
    uninterrupted run, and an export gathered from FSDP, with EMA. With one process FSDP
    runs unsharded (NO_SHARD): sharding across ranks is tested on CPU processes (the test
    below); this one runs the shipped file through accelerate itself on a GPU. The
    trainer's train.mixed_precision ("no" here) overrides the file's bf16. accelerate turns
    FSDP on only for GPU processes (MULTI_CPU ignores it), so CPU CI cannot run this; the
    GPU suite does."""
    out = tmp_path / "fsdp"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
        "--main_process_port", "29519", str(ROOT / "scripts" / "train.py"), "--config", str(TOY),
    ]  # fmt: skip
    straight = tmp_path / "straight"
    ema = "ema.enabled=true"  # each rank's shard of it in its own file (ace/train/ema.py)
    runs = [
        args(data, out, 4, "data.batch_size=2", "train.checkpoint_every=2", ema, *TINY_TOY),
        args(data, out, 6, "data.batch_size=2", "train.resume=latest", ema, *TINY_TOY),
        args(data, straight, 6, "data.batch_size=2", "train.checkpoint_every=2", ema, *TINY_TOY),
    ]
    for run_args in runs:
        result = subprocess.run([*launch, *run_args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    sharded = list(out.glob("checkpoint-*/pytorch_model_fsdp*"))  # accelerate's FSDP layout
    assert sharded, sorted(p.name for p in out.glob("checkpoint-*/*"))
    assert (out / "checkpoint-6" / "ema_shard_0.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    ACEPipeline.from_pretrained(out / "pipeline")
    # the resumed run continues the uninterrupted one: weights AND Adam's moments came back
    # (accelerate's FSDP loading fills only existing optimizer entries; see the test above)
    a, b = weights(straight), weights(out)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert json.loads((out / "ranks.json").read_text())["in_sync"] is None  # shards differ


def torchrun_ema(data, script, out, steps, *extra, port=29531):
    """Two CPU processes of ``script`` (scripts/train.py, or tests/_fsdp_cpu.py [--file F])
    on configs/tiny.yaml with EMA."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), *map(str, script),
        *(["--config"] if script[0].name == "train.py" else []),
        str(CONFIG), *args(data, out, steps, "data.batch_size=2", "train.checkpoint_every=2",
                           "ema.enabled=true", "ema.decay=0.5", *extra),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cpu_only())
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_ema(data, tmp_path_factory):
    """The reference of the FSDP tests: 6 DDP steps with EMA on two CPU processes."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun_ema(data, [ROOT / "scripts" / "train.py"], out, 6)
    return out


@pytest.mark.parametrize("file", ["fsdp.yaml", "fsdp2.yaml"])
def test_fsdp_on_two_cpu_ranks_with_ema_matches_ddp_and_resumes(data, ddp_ema, tmp_path, file):
    """Real FSDP across two CPU ranks (tests/_fsdp_cpu.py with the fsdp_config of
    configs/accelerate/FILE: FSDP1's FULL_SHARD or FSDP2's fully_shard, one unit per
    ACEBlock, sharded checkpoints) with EMA, each rank averaging its own shard and saving it
    to its own file, and gradient checkpointing around the FSDP units. The reference is
    DDP, where every rank holds the whole model (and nothing is recomputed): 4 FSDP steps,
    then a resume from the sharded checkpoint to 6, must log DDP's 6 losses and export
    DDP's EMA weights."""
    shim = [ROOT / "tests" / "_fsdp_cpu.py", "--file", ROOT / "configs" / "accelerate" / file]
    fsdp, ddp = tmp_path / "fsdp", ddp_ema
    recompute = "model.gradient_checkpointing=true"  # as the released 1024 px recipe
    torchrun_ema(data, shim, fsdp, 4, recompute)
    torchrun_ema(data, shim, fsdp, 6, recompute, "train.resume=latest")
    checkpoint = fsdp / "checkpoint-6"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # accelerate's sharded layout
    shards = [load_file(checkpoint / f"ema_shard_{r}.safetensors") for r in (0, 1)]
    total = sum(t.numel() for t in weights(ddp).values())  # every parameter, once
    assert [sum(t.numel() for t in s.values()) for s in shards] != [total, 0]  # both hold some
    assert sum(t.numel() for s in shards for t in s.values()) == total  # and nothing twice
    assert json.loads((fsdp / "ranks.json").read_text())["in_sync"] is None
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-6)
    a, b = weights(fsdp), weights(ddp)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    # bf16: FSDP's mixed precision cast the forward's float inputs to bf16 by default, which
    # rounded the DDPM timesteps (999 became 1000) where DDP and the sampler keep them
    torchrun_ema(data, shim, tmp_path / "bf16", 1, "train.mixed_precision=bf16")
    assert json.loads((tmp_path / "bf16" / "timestep_dtypes.json").read_text()) == ["torch.float32"]


def test_an_ema_shard_round_trips_and_a_wrong_one_is_named(tmp_path):
    """ace/train/ema.py: a rank's EMA state (shadow tensors, step counter) comes back
    exactly; a missing file or a shard of another shape is a ValueError naming the file."""
    from diffusers.training_utils import EMAModel

    from ace.train.ema import load_ema_shard, save_ema_shard

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.zeros(0))]
    ema = EMAModel(params, decay=0.9)
    for _ in range(3):
        params[0].data.add_(1.0)
        ema.step(params)
    save_ema_shard(ema, tmp_path, rank=1)
    back = EMAModel([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(0))])
    load_ema_shard(back, tmp_path, 1)
    assert back.optimization_step == 3 and back.decay == 0.9
    assert all(torch.equal(x, y) for x, y in zip(back.shadow_params, ema.shadow_params))
    with pytest.raises(ValueError, match=r"ema_shard_0\.safetensors is missing"):
        load_ema_shard(back, tmp_path, 0)
    other = EMAModel([torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(0))])
    with pytest.raises(ValueError, match=r"ema_shard_1\.safetensors does not match"):
        load_ema_shard(other, tmp_path, 1)


def test_optimizer_state_is_materialised_without_changing_a_weight(data, tmp_path):
    """What an FSDP resume runs before accelerate's load_state (which fills only existing
    optimizer entries): every parameter gets AdamW state, no weight moves, lr is restored."""
    trainer = Trainer(
        load_config(CONFIG, args(data, tmp_path / "run", 4, "optim.weight_decay=0.1"))
    )
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    opt = trainer.optimizer.optimizer
    lrs = [g["lr"] for g in opt.param_groups]
    assert not opt.state
    trainer._materialise_optimizer_state()
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(set(opt.state[p]) >= {"exp_avg", "exp_avg_sq", "step"} for p in params)
    assert all(p.grad is None for p in params)
    after = trainer.unwrapped.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [g["lr"] for g in opt.param_groups] == lrs
    assert all(g["fused"] for g in opt.param_groups)  # optim.fused's default


def test_fused_adamw_follows_the_per_parameter_loop_and_not_under_fp16():
    """optim.fused (the default) runs torch's fused kernel: the same AdamW as the loop
    torch runs on CPU by default, to rounding, with the config's lr, betas, eps and decay."""
    o = OptimConfig(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    assert o.fused
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    fused_params = [torch.nn.Parameter(p.clone()) for p in start]
    loop_params = [torch.nn.Parameter(p.clone()) for p in start]
    cpu = torch.device("cpu")
    fused = build_optimizer(fused_params, o, "no", cpu)
    loop = build_optimizer(loop_params, dataclasses.replace(o, fused=False), "no", cpu)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for step in grads:
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
    for a, b, p0 in zip(fused_params, loop_params, start):
        assert not torch.equal(a, p0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # torch's GradScaler (accelerate's under fp16) calls a fused step even when it skips it
    assert not build_optimizer(start, o, "fp16", cpu).defaults["fused"]
    assert build_optimizer(start, o, "bf16", cpu).defaults["fused"]
    # devices whose fused kernel is not known to every torch this library supports
    assert not build_optimizer(start, o, "no", torch.device("meta")).defaults["fused"]


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import accelerate
    from ace.train import Trainer, load_config

    original = accelerate.Accelerator.save_state
    def save_then_die(self, output_dir=None, **kw):
        if "checkpoint-10" in str(output_dir):  # the second checkpoint: die half-way through it
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir, **kw)
    accelerate.Accelerator.save_state = save_then_die
    Trainer(load_config(sys.argv[1], sys.argv[2:])).train()
    """
)


def test_sigkill_while_checkpointing_leaves_the_previous_checkpoint_resumable(data, tmp_path):
    out = tmp_path / "crash"
    cmd = [sys.executable, "-c", KILLER, str(CONFIG), *args(data, out, 12)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL
    assert (out / "checkpoint-5" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-10").exists()  # the half-written one never got its final name
    trainer = Trainer(load_config(CONFIG, [*args(data, out, 12), "train.resume=latest"]))
    trainer.train()
    assert trainer.step == 12
    straight = tmp_path / "straight"
    Trainer(load_config(CONFIG, args(data, straight, 12))).train()
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the crash cost time, not correctness


def test_non_finite_losses_skip_steps_then_stop(data, tmp_path, monkeypatch):
    trainer = Trainer(
        load_config(CONFIG, args(data, tmp_path / "nan", 10, "train.max_nonfinite=3"))
    )
    real = trainer.objective.loss  # NaN through the model: every weight gets a NaN gradient
    monkeypatch.setattr(trainer.objective, "loss", lambda *a, **k: real(*a, **k) * float("nan"))
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    with pytest.raises(TrainingStopped, match="3 steps in a row with a non-finite loss"):
        trainer.train()
    assert all(
        torch.equal(before[n], p) for n, p in trainer.unwrapped.named_parameters()
    )  # never stepped
    lines = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    strict = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) for line in lines
    ]
    assert strict and all(r["loss"] is None and r["skipped_step"] for r in strict)  # not NaN


def test_non_finite_micro_batch_skips_its_accumulation_window(data, tmp_path, monkeypatch):
    """Backward runs whatever the loss (the step's one host sync comes after it), so a
    non-finite micro-batch leaves non-finite gradients: its window must not step, and the
    window after it must step from clean gradients."""
    trainer = Trainer(load_config(CONFIG, args(data, tmp_path / "acc", 8, "train.grad_accum=2")))
    real = trainer.objective.loss
    calls = []

    def loss(*a, **k):
        calls.append(1)
        value = real(*a, **k)
        return value * float("nan") if len(calls) == 1 else value  # the first micro-batch

    monkeypatch.setattr(trainer.objective, "loss", loss)
    params = lambda: {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}  # noqa: E731
    before = params()
    row = trainer.train_step()  # window 1: NaN, then finite
    assert row["skipped_step"] and len(calls) == 2
    assert all(torch.equal(before[n], p) for n, p in params().items())  # window 1 did not step
    row = trainer.train_step()  # window 2: both finite
    after = params()
    assert not row["skipped_step"] and len(calls) == 4
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # window 2 stepped


def test_max_nonfinite_counts_skipped_steps_not_micro_batches(data, tmp_path, monkeypatch):
    """A NaN in the first micro-batch of every window skips every step, though most
    micro-batches are finite: the run stops after train.max_nonfinite such steps instead of
    skipping every step to the end and exporting untrained weights."""
    run = args(data, tmp_path / "acc", 8, "train.grad_accum=2", "train.max_nonfinite=3")
    trainer = Trainer(load_config(CONFIG, run))
    real, calls = trainer.objective.loss, []

    def loss(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) % 2 else 1.0)  # each window's first

    monkeypatch.setattr(trainer.objective, "loss", loss)
    with pytest.raises(TrainingStopped, match="3 steps in a row with a non-finite loss"):
        trainer.train()
    assert len(calls) == 6 and not (tmp_path / "acc" / "pipeline").exists()


def test_max_steps_and_the_lr_schedule_count_optimizer_steps(data, tmp_path):
    """With train.grad_accum=2 a step is two micro-batches: max_steps, the rows and the
    LR warm-up all count optimizer steps (lr_factor by hand: warm-up over 10 steps)."""
    out = tmp_path / "accum"
    extra = ["train.grad_accum=2", "optim.warmup_steps=10", "train.log_every=1", "optim.lr=1e-3"]
    trainer = Trainer(load_config(CONFIG, args(data, out, 3, *extra)))
    micro = []
    real = trainer.forward_loss
    trainer.forward_loss = lambda index: micro.append(index) or real(index)
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and micro == [0, 1, 2, 3, 4, 5]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * k / 11 for k in (1, 2, 3)])  # used
    # a micro-batch: 2 text-to-image LCUs (one 16-token frame) and 2 edits (two frames)
    assert rows[0]["tokens"] == 2 * (2 * 16 + 2 * 32)


def test_train_step_runs_without_train(data, tmp_path):
    # a notebook or a profiler drives the steps itself: nothing may wait for train()
    trainer = Trainer(load_config(CONFIG, args(data, tmp_path / "steps", 2)))
    row = trainer.train_step()
    assert row["step"] == 1 and math.isfinite(row["loss"]) and not row["skipped_step"]


def test_bad_samples_are_skipped_and_counted(data, tmp_path, capsys):
    broken = tmp_path / "broken"
    write_manifest(solid_lcus(8), broken, progress=False)
    first = json.loads((broken / "manifest.jsonl").read_text().splitlines()[0])
    (broken / first["target"]).write_bytes(b"not a png")  # a corrupt image
    second = json.loads((broken / "manifest.jsonl").read_text().splitlines()[1])
    (broken / second["turns"][0]["images"][0]).unlink()  # a missing image
    with pytest.warns(UserWarning, match="skipping sample"):  # train.py, in-process
        argv = ["--config", CONFIG, *args(broken, tmp_path / "run", 6)]
        code, out, _ = run_script(ROOT / "scripts" / "train.py", argv, capsys)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["skipped_samples"] >= 2 and len(rows) == 6
    # ... and said once more at the end, after the bar
    assert code == 0 and f"{rows[-1]['skipped_samples']} sample(s) skipped" in out, out


def test_a_rank_whose_whole_batch_fails_skips_the_step_and_goes_on(tmp_path):
    """One sample per step: a missing target and a target too small to train on (it passes
    the manifest's checks, then resizes to nothing) each skip their step, counted; the run
    goes on and exports. A dataset where nothing loads stops with a clear error."""
    data = tmp_path / "data"
    lcus = list(solid_lcus(4))
    lcus[2] = LCU(ConditionUnit("a thin strip"), target=Image.new("RGB", (300, 12)), task="t2i")
    write_manifest(lcus, data, progress=False)
    records = (data / "manifest.jsonl").read_text().splitlines()
    (data / json.loads(records[1])["turns"][0]["images"][0]).unlink()
    out = tmp_path / "run"
    config = load_config(CONFIG, [*args(data, out, 8, "data.batch_size=1", "train.log_every=1")])
    with pytest.warns(UserWarning, match="skipping sample"):
        Trainer(config).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and (out / "pipeline").is_dir()
    skipped = [r["skipped_step"] for r in rows]
    assert sum(skipped) == 4 and rows[-1]["skipped_samples"] == 4  # 2 bad of 4, 2 epochs
    for r in rows:
        assert (r["tokens"] == 0) == r["skipped_step"]

    for record in records:  # now every target is missing
        (data / json.loads(record)["target"]).unlink(missing_ok=True)
    config = load_config(CONFIG, [*args(data, tmp_path / "none", 8, "data.batch_size=1")])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no sample of the dataset loads"):  # fmt: skip
        Trainer(config).train()


def test_two_process_shard_stream_resumes_exactly(data, tmp_path):
    """accelerate writes a registered object's state from the main process only: every
    rank's stream position must be in it, or rank 1 resumes with rank 0's (refused)."""
    from ace.data.shards import write_shards

    write_shards(data, tmp_path / "shards", samples_per_shard=4, progress=False)
    shards = f"data.shards={tmp_path / 'shards' / 'shard-{000000..000003}.tar'}"

    def torchrun(out, steps, *extra):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
            str(ROOT / "scripts" / "train.py"), "--config", str(CONFIG),
            *args(data, out, steps, shards, "data.batch_size=2", "train.checkpoint_every=2", *extra),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cpu_only())
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(tmp_path / "straight", 4)
    torchrun(tmp_path / "split", 2)
    torchrun(tmp_path / "split", 4, "train.resume=latest")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_weights_or_optimizer_settings(data, tmp_path):
    """A checkpoint restores the optimizer's lr, betas ... as they were: a resume that asks
    for others is refused, naming them. A path or max_steps may change; rows the crashed run
    logged after its last checkpoint are not repeated."""
    out = tmp_path / "run"
    Trainer(load_config(CONFIG, args(data, out, 4, "train.checkpoint_every=3", "train.keep_last=2"))).train()  # fmt: skip
    for extra, named in (
        (["optim.lr=1e-5"], r"\(optim\.lr=0\.0003 there, 1e-05 now\)"),
        (["ema.enabled=true"], "ema.enabled"),
        (["model.overrides.depth=1"], "model.overrides.depth"),
        # the data position: micro-batch step * grad_accum + k of batch_size samples
        (["train.grad_accum=2"], "train.grad_accum=1 there, 2 now"),
        (["data.batch_size=2"], "data.batch_size=4 there, 2 now"),
        (["data.max_tokens=96"], "data.max_tokens=0 there, 96 now"),
        # the epoch order, and the size every sample is resized to
        (["train.seed=7"], "train.seed=0 there, 7 now"),
        (["data.max_seq_len=64"], "data.max_seq_len=None there, 64 now"),
    ):
        resumed = load_config(CONFIG, [*args(data, out, 6, "train.resume=latest", *extra)])
        with pytest.raises(ValueError, match=named):
            Trainer(resumed).train()
    # a vocabulary refitted to other ids (model.text_encoder=words) would read other words
    state_file = out / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["tokenizer"]
    state_file.write_text(json.dumps({**state, "tokenizer": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="another tokenizer vocabulary"):
        Trainer(load_config(CONFIG, [*args(data, out, 6, "train.resume=latest")])).train()
    # a VAE whose encoder or scaling factor changed (one deleted and trained again, say)
    assert state["vae"].endswith(":0.18215")
    state_file.write_text(json.dumps({**state, "vae": "0123456789abcdef:0.18215"}))
    with pytest.raises(ValueError, match=r"trained on another VAE's latents than this run's model\.vae \(tiny"):  # fmt: skip
        Trainer(load_config(CONFIG, [*args(data, out, 6, "train.resume=latest")])).train()
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # the global batch differs
    with pytest.raises(ValueError, match="trained on 2 processes, this run has 1"):
        Trainer(load_config(CONFIG, [*args(data, out, 6, "train.resume=latest")])).train()
    shutil.rmtree(out / "checkpoint-4")  # as if the run had crashed after logging step 4 ...
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # ... and while writing the row of step 5
    Trainer(load_config(CONFIG, [*args(data, out, 6, "train.resume=latest", "train.log_every=1")])).train()  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_stepz=3"], "max_stepz"),
        (["optim.lr=fast"], "optim.lr"),
        (["train.max_steps"], "key=value"),
        (["data.cond_dropout=1.5"], "cond_dropout"),
        (["data.toy_size=40"], "data.toy_size: impossible image size 40: need a multiple of 16"),
        (["train.checkpoint_every=0"], "train.checkpoint_every must be >= 1"),
        ([f"data.toy_seed={2**32}"], r"data\.toy_seed must lie in \[0, 2\*\*32\)"),
        (["train.log_every=0"], "train.log_every must be >= 1"),
        (["train.keep_last=0"], "train.keep_last must be >= 1"),
        (["train.max_nonfinite=0"], "train.max_nonfinite must be >= 1"),
        (["optim.betas=[0.9,abc]"], r"override 'optim.betas=\[0.9,abc\]'"),
        (["optim.betas=[0.9]"], r"override 'optim.betas=\[0.9\]'.*length 1"),
        (["train=3"], "override 'train=3'"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["optim.warmup_steps=-3"], "optim.warmup_steps must be >= 0"),
        (["optim.grad_clip=-1"], "optim.grad_clip must be >= 0"),
        (["ema.decay=-1"], r"ema.decay must be in \[0, 1\)"),
        (["ema.decay=2"], r"ema.decay must be in \[0, 1\)"),
        (["data.max_seq_len=0"], "data.max_seq_len must be >= 1 or null"),
        (["objective.name=ddim"], r"objective.name must be one of ddpm-eps, rectified-flow"),
        (["model.attention_backend=xformers"], r"model.attention_backend must be one of auto"),
        (["model.text_encoder_dtype=half"], r"model.text_encoder_dtype must be one of auto, fp32"),
        (['train.resume=""'], r"train.resume must be latest, a checkpoint directory or null"),
        (["model.preset=tinyy"], r"model.preset must be one of ace-0.6b-512, .*got 'tinyy'"),
        (
            ["model.overrides.deph=3"],
            r"model.overrides: unknown ACETransformer argument\(s\) \['deph'\]",
        ),
        (["train.seed=4294967296"], r"train.seed must be < 2\*\*32"),
        (["train.trackers=[tensorbord]"], r"train.trackers: unknown tracker 'tensorbord'"),
        (["optim.lr=inf"], "optim.lr must be finite"),
        (["optim.weight_decay=inf"], "optim.weight_decay must be finite"),
        (["objective.shift=0"], "objective.shift must be > 0"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0"),
        (["data.shuffle_buffer=-5"], "data.shuffle_buffer must be >= 0"),
        (["data.toy_weights.txt2img=1"], "data.toy_weights: unknown task 'txt2img'"),
        (["data.toy_weights.edge_map=-1"], "data.toy_weights.edge_map must be finite and >= 0"),
        (["data.toy_weights.edge_map=nan"], "data.toy_weights.edge_map must be finite"),
        (["data.toy_weights.edge_map=abc"], "override 'data.toy_weights.edge_map=abc'"),
        ([f"data.toy_weights.{t}=0" for t in TASKS], "data.toy_weights: every task has weight 0"),
    ],
)
def test_bad_config_names_the_key(data, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG, [f"data.manifest={data}", *overrides])


def test_a_tracker_that_is_not_installed_is_named(data, monkeypatch):
    """accelerate drops a tracker whose package is missing with a warning, and the run
    would log nowhere (the 0.6B configs ask for tensorboard, a dev extra here)."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"train.trackers: tensorboard is not installed"):
        load_config(CONFIG, [f"data.manifest={data}", "train.trackers=[tensorboard]"])


def test_toy_weights_set_the_generated_mix(tmp_path):
    """data.toy_weights reweights the tasks of the split data.toy_n makes: the manifest is
    sample_stream's with those weights (the tasks not named keep DEFAULT_WEIGHTS)."""
    from ace.data.toy import sample_stream
    from ace.train.config import DataConfig
    from ace.train.data import build_dataset

    only = {t: 0.0 for t in TASKS if t not in ("text_to_image", "grayscale")}
    cfg = DataConfig(manifest=str(tmp_path / "d"), toy_n=12, toy_size=32, toy_weights=only)
    tasks = [r["task"] for r in build_dataset(cfg).records]
    expected = [s.lcu.task for s in sample_stream(12, 0, size=32, weights=only)]
    assert tasks == expected and set(tasks) == {"text_to_image", "grayscale"}
    # and with none named, the default mix
    plain = build_dataset(DataConfig(manifest=str(tmp_path / "p"), toy_n=12, toy_size=32))
    assert [r["task"] for r in plain.records] == [s.lcu.task for s in sample_stream(12, 0, size=32)]


def test_toy_settings_against_an_existing_split_are_warned(data, tmp_path):
    """data.toy_* make a manifest only where there is none: one already there of another
    size, seed, image size or mix is trained on, and said so, naming what differs."""
    import warnings

    from ace.train.config import DataConfig
    from ace.train.data import build_dataset

    def quiet(cfg):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            build_dataset(cfg)
        return not [w for w in seen if "not used" in str(w.message)]

    message = r"data\.toy_n=8 \(the split's: 16\): not used, .* already holds 16 LCUs"
    with pytest.warns(UserWarning, match=message):
        assert len(build_dataset(DataConfig(manifest=str(data), toy_n=8))) == 16
    assert quiet(DataConfig(manifest=str(data), toy_n=0))
    assert quiet(DataConfig(manifest=str(data), toy_n=16))
    made = dict(manifest=str(tmp_path / "toy"), toy_n=6, toy_size=32)
    assert quiet(DataConfig(**made))  # makes it, and records how
    assert quiet(DataConfig(**made))  # the same settings again
    other = {"toy_seed": 3, "toy_size": 64, "toy_weights": {"recolor": 2.0}}
    message = r"data.toy_seed=3 \(the split's: 0\); data.toy_size=64 \(the split's: 32\); data.toy_weights=\{'recolor': 2.0\} \(the split's: \{\}\): not used"  # fmt: skip
    with pytest.warns(UserWarning, match=message):
        build_dataset(DataConfig(**{**made, **other}))
    # a record that cannot be read only costs that check, and says so
    for broken in ("{not json", "[1, 2]"):
        (tmp_path / "toy" / "toy.json").write_text(broken)
        with pytest.warns(UserWarning, match=r"toy\.json: unreadable .* training on the split"):
            assert len(build_dataset(DataConfig(**{**made, **other}))) == 6


def test_a_resume_on_a_changed_manifest_is_warned(data, tmp_path):
    """The same manifest resumes silently; an edited one warns that the order is not exact."""
    import warnings

    own = tmp_path / "data"
    shutil.copytree(data, own)
    out = tmp_path / "run"
    Trainer(load_config(CONFIG, args(own, out, 3, "train.checkpoint_every=3"))).train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(load_config(CONFIG, [*args(own, out, 4), "train.resume=latest"])).train()
    assert not [w for w in seen if "manifest differs" in str(w.message)]
    manifest = own / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # one record fewer
    with pytest.warns(UserWarning, match=r"manifest differs .* \(16 records then, 15 now\)"):
        Trainer(load_config(CONFIG, [*args(own, out, 5), "train.resume=latest"])).train()


def test_a_resume_on_other_token_costs_is_warned(data, tmp_path):
    """Token-budget mode packs every epoch from the records' costs: a resume on the same
    ones is silent; one where a file read then cannot be read now (so its record is left
    out) warns that the batches are not those an uninterrupted run would see."""
    import warnings

    own = tmp_path / "data"
    shutil.copytree(data, own)
    out, budget = tmp_path / "run", "data.max_tokens=40"
    Trainer(load_config(CONFIG, args(own, out, 3, budget, "train.checkpoint_every=3"))).train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(load_config(CONFIG, [*args(own, out, 4, budget), "train.resume=latest"])).train()
    assert not [w for w in seen if "token costs differ" in str(w.message)]
    first = json.loads((own / "manifest.jsonl").read_text().splitlines()[0])
    (own / first["target"]).write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"token costs differ .* \(0 record\(s\) left out then, 1 now\)"):  # fmt: skip
        Trainer(load_config(CONFIG, [*args(own, out, 5, budget), "train.resume=latest"])).train()


def test_mixed_precision_no_survives_yaml(data, tmp_path):
    """YAML 1.1 reads a bare no as False: train.mixed_precision=no (the documented value)
    and ``mixed_precision: no`` in a file both mean no mixed precision."""
    big, manifest = ROOT / "configs" / "ace_0.6b_512.yaml", f"data.manifest={data}"
    assert load_config(big, [manifest]).train.mixed_precision == "bf16"
    cfg = load_config(big, [manifest, "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    (tmp_path / "no.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "no.yaml", [manifest]).train.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"train\.mixed_precision must be no, bf16 or fp16"):
        load_config(CONFIG, [f"data.manifest={data}", "train.mixed_precision=yes"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.overrides.depth=abc", r"model\.overrides=.*depth must be an int >= 1, got 'abc'"),
        ("model.overrides.patch_size=0", "patch_size must be an int >= 1, got 0"),
        ("model.overrides.mlp_ratio=-1", "mlp_ratio must be a number > 0, got -1"),
        ("model.overrides.pred_sigma=maybe", "pred_sigma must be true or false, got 'maybe'"),
        ("model.overrides.text_dim=16", r"model\.overrides\.text_dim=16, but the text encoder makes 32"),
        ("model.overrides.depht=3", r"unknown ACETransformer argument\(s\) \['depht'\]"),
    ],
)  # fmt: skip
def test_bad_model_overrides_name_the_key(data, tmp_path, override, message):
    """Each was a traceback from inside a layer (or, text_dim, a matmul error at step 1;
    pred_sigma=maybe trained)."""
    with pytest.raises(ValueError, match=message):
        Trainer(load_config(CONFIG, args(data, tmp_path / "run", 1, override)))


def test_bad_yaml_files_are_one_line_errors(data, tmp_path):
    (tmp_path / "broken.yaml").write_text("train: {max_steps: 3\n")
    (tmp_path / "list.yaml").write_text("- train\n- data\n")
    (tmp_path / "betas.yaml").write_text("optim:\n  betas: [0.9, abc]\n")
    for name, message in [
        ("broken.yaml", "is not valid YAML"),
        ("list.yaml", "must hold a mapping"),
        ("betas.yaml", "betas.yaml"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(tmp_path / name, [f"data.manifest={data}"])


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: nothing is locked")
def test_a_second_run_in_a_busy_output_dir_is_refused(data, tmp_path):
    """While one process trains in OUTPUT, another is refused before it touches anything
    (here: the first run's checkpoint being written); once the first dies, even by
    SIGKILL, the directory is free."""
    out = tmp_path / "run"
    (out / ".tmp-checkpoint-3").mkdir(parents=True)  # the busy run's save in progress
    ready = Trainer(load_config(CONFIG, args(data, out, 2)))  # built before the other began
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ace.train.lock import run_lock\n"
         f"with run_lock(Path({str(out)!r})):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        busy = rf"in use by another run \(pid {holder.pid}\)"
        with pytest.raises(ValueError, match=busy):
            ready.train()
        assert (out / ".tmp-checkpoint-3").is_dir() and not (out / "metrics.jsonl").exists()
        (out / "metrics.jsonl").write_text('{"step": 1}\n')  # the busy run, before its checkpoint
        with pytest.raises(ValueError, match=busy):  # not "stopped before its first checkpoint"
            Trainer(load_config(CONFIG, args(data, out, 2)))
        from ace.train.trainer import check_output_dir

        with pytest.MonkeyPatch.context() as env:  # torchrun's other ranks leave it to rank 0
            env.setenv("RANK", "1")
            check_output_dir(load_config(CONFIG, args(data, out, 2)))
        (out / "metrics.jsonl").unlink()
    finally:
        holder.kill()
        holder.wait()
    Trainer(load_config(CONFIG, args(data, out, 2))).train()  # the kernel dropped the lock
    assert (out / "pipeline" / "model_index.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_checkpoints_and_the_export_reach_the_disk_before_their_rename(data, tmp_path, monkeypatch):
    """A machine that goes down after a rename may keep the name but not the data: every
    file of a checkpoint (and of the pipeline) is fsynced under its temporary name, and the
    output directory after the rename."""
    synced = []

    def fsync(fd, real=os.fsync):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = (tmp_path / "run").resolve()
    Trainer(load_config(CONFIG, args(data, out, 2, "train.checkpoint_every=2"))).train()
    for final, tmp in [("checkpoint-2", ".tmp-checkpoint-2"), ("pipeline", ".tmp-pipeline")]:
        files = {p.relative_to(out / final) for p in (out / final).rglob("*") if p.is_file()}
        flushed = {Path(s).relative_to(out / tmp) for s in synced if s.startswith(f"{out / tmp}/")}
        assert files and files <= flushed, files - flushed
    assert str(out) in synced[synced.index(str(out / ".tmp-pipeline")) :]  # the rename, after


def test_a_run_lock_is_refused_within_one_process_too(tmp_path):
    from ace.train.lock import run_lock

    held, busy = run_lock(tmp_path / "out"), pytest.raises(ValueError, match="another run")
    with held, busy, run_lock(tmp_path / "out"):
        pass
    with run_lock(tmp_path / "out"):  # released on exit
        pass


def test_an_output_dir_holding_a_run_is_refused_without_resume(data, tmp_path):
    """A fresh run there would append to the old rows, overwrite config.json and, resumed
    later, load the old run's optimizer state; a file is no directory either."""
    out = tmp_path / "run"
    Trainer(load_config(CONFIG, args(data, out, 2, "train.checkpoint_every=2"))).train()
    with pytest.raises(ValueError, match=r"already holds a run .*train.resume=latest"):
        Trainer(load_config(CONFIG, args(data, out, 2, "optim.lr=1e-3")))
    # a run that stopped before its first checkpoint: the message said to resume, and the
    # resume then said there was nothing to resume
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"stopped before its first checkpoint .*delete that"):
        Trainer(load_config(CONFIG, args(data, early, 2)))
    # one that failed before logging a row (an error or out-of-memory at step 1) lost
    # nothing: the corrected rerun goes ahead
    (early / "metrics.jsonl").write_text("")
    (early / "config.json").write_text("{}")
    Trainer(load_config(CONFIG, args(data, early, 2))).train()
    assert len(losses(early)) == 2
    (tmp_path / "file").write_text("")
    for where in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ValueError, match="is a file, not a directory"):
            Trainer(load_config(CONFIG, args(data, where, 2)))
    # the checkpoint carries its run's config: a copy moved elsewhere is still checked
    moved = tmp_path / "moved" / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", moved)
    resumed = load_config(CONFIG, args(data, tmp_path / "new", 4, f"train.resume={moved}", "optim.lr=1e-3"))  # fmt: skip
    with pytest.raises(ValueError, match=r"optim\.lr"):
        Trainer(resumed).train()


def test_resume_past_max_steps_warns_and_stale_temporaries_go(data, tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(CONFIG, args(data, out, 2, "train.checkpoint_every=2"))).train()
    (out / ".tmp-checkpoint-7").mkdir()  # as an interrupted save leaves it
    (out / ".tmp-pipeline").mkdir()
    resumed = load_config(CONFIG, args(data, out, 1, "train.resume=latest"))
    with pytest.warns(UserWarning, match="at step 2, train.max_steps is 1: nothing to train"):
        Trainer(resumed).train()
    assert not list(out.glob(".tmp-*")) and (out / "pipeline").is_dir()
    # exporting an earlier checkpoint trains nothing: the later work stays
    out = tmp_path / "two"
    Trainer(load_config(CONFIG, args(data, out, 2, "train.checkpoint_every=1"))).train()
    early = load_config(CONFIG, args(data, out, 1, f"train.resume={out / 'checkpoint-1'}"))
    with pytest.warns(UserWarning, match="at step 1, train.max_steps is 1: nothing to train"):
        Trainer(early).train()
    assert (out / "checkpoint-2").is_dir() and len(losses(out)) == 2


def test_fp16_on_cpu_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        Trainer(load_config(CONFIG, args(data, tmp_path / "run", 2, "train.mixed_precision=fp16")))


def test_skipped_samples_survive_a_resume(tmp_path):
    """The running count of skipped samples is every rank's since step 0, resumed or not."""
    data = tmp_path / "data"
    write_manifest(solid_lcus(4), data, progress=False)
    first = json.loads((data / "manifest.jsonl").read_text().splitlines()[0])
    (data / first["target"]).unlink()
    extra = ["data.batch_size=1", "train.log_every=1", "train.checkpoint_every=3"]
    with pytest.warns(UserWarning, match="skipping sample"):
        Trainer(load_config(CONFIG, args(data, tmp_path / "straight", 8, *extra))).train()
        Trainer(load_config(CONFIG, args(data, tmp_path / "split", 3, *extra))).train()
        Trainer(load_config(CONFIG, args(data, tmp_path / "split", 8, *extra, "train.resume=latest"))).train()  # fmt: skip

    def skipped(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["skipped_samples"] for line in lines]

    straight, split = skipped("straight"), skipped("split")
    assert straight == split and straight[-1] == 2  # 1 bad of 4, 2 epochs


def test_model_mistakes_are_named_before_the_toy_vae_and_the_cache(data, tmp_path):
    """A bad text encoder path used to surface after the toy VAE had trained (minutes in
    the demo's config), and a max_seq_len past the model's RoPE table at step 1, after the
    embedding cache was built, without naming the key."""
    vae = tmp_path / "vae"
    toy = [f"data.manifest={data}", f"model.vae={vae}", "model.vae_toy_steps=2", "model.text_encoder=/no/t5", f"train.output_dir={tmp_path / 'a'}"]  # fmt: skip
    with pytest.raises(ValueError, match=r"model.text_encoder: /no/t5 is not tiny, words or a T5"):
        Trainer(load_config(TOY, toy))
    assert not vae.exists()
    cache = tmp_path / "cache"
    long = [f"data.cache={cache}", "data.max_seq_len=100000"]
    with pytest.raises(ValueError, match=r"data.max_seq_len=100000 resizes images past the model's rope_max_len=256 tokens of 16 px: at most 256"):  # fmt: skip
        Trainer(load_config(CONFIG, args(data, tmp_path / "b", 1, *long)))
    assert not cache.exists()


def test_a_preset_that_cannot_read_the_vae_is_named_before_training(data, tmp_path):
    """configs/tiny.yaml with model.preset=toy: a matmul shape error at the first step."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.preset=toy reads 8 latent channels but the VAE"):
        Trainer(load_config(CONFIG, args(data, out, 2, "model.preset=toy")))
    assert not (out / "metrics.jsonl").exists()


def test_missing_manifest_and_script_errors(tmp_path, capsys):
    """Each config's own output_dir is replaced: the README runs make demo, which fills
    outputs/demo/train, and then make test."""
    out = f"train.output_dir={tmp_path / 'out'}"
    missing_vae = [f"model.vae={tmp_path / 'no-vae'}", "model.vae_toy_steps=0", out]
    with pytest.raises(
        ValueError, match=r"model\.pretrained: no ACEPipeline directory at .*convert_official"
    ):
        Trainer(load_config(CONFIG, [f"model.pretrained={tmp_path / 'no-pipe'}", out]))
    with pytest.raises(ValueError, match=r"model\.vae: no VAE directory"):
        Trainer(load_config(TOY, [f"data.manifest={tmp_path / 'none'}", *missing_vae]))
    assert not (tmp_path / "no-vae").exists()
    assert not (tmp_path / "none").exists()  # failed before making toy data for the words encoder
    with pytest.raises(ValueError, match="no manifest at"):
        Trainer(load_config(CONFIG, [f"data.manifest={tmp_path / 'none'}", "data.toy_n=0", out]))
    (tmp_path / "empty.jsonl").write_text("\n")
    for budget in ("data.max_tokens=0", "data.max_tokens=64"):  # an empty packing said otherwise
        with pytest.raises(ValueError, match=r"data\.manifest: .*empty\.jsonl holds no LCUs"):
            Trainer(load_config(CONFIG, [f"data.manifest={tmp_path / 'empty.jsonl'}", budget, out]))
    named = tmp_path / "toy" / "train.jsonl"  # toy_n writes DIR/manifest.jsonl, not this
    with pytest.raises(ValueError, match=r"give data\.manifest as that directory"):
        Trainer(load_config(CONFIG, [f"data.manifest={named}", "data.toy_n=4", out]))
    assert not (tmp_path / "toy").exists()
    with pytest.raises(ValueError, match=r"model\.text_encoder: .* is not tiny, words or a T5"):
        Trainer(load_config(CONFIG, [f"data.manifest={tmp_path / 'none'}", f"model.text_encoder={tmp_path / 'no-t5'}", out]))  # fmt: skip
    missing = pytest.warns(UserWarning, match="skipping the rest of a shard")
    with pytest.raises(ValueError, match=r"data.shards=.*no sample"), missing, pytest.warns(UserWarning, match="read no samples"):  # fmt: skip
        Trainer(load_config(CONFIG, [f"data.shards={tmp_path / 'none.tar'}", f"train.output_dir={tmp_path / 'sh'}"])).train()  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(CONFIG), "train.bogus=1"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert (
        result.returncode == 2 and "train.py: error:" in result.stderr and "bogus" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_tensorboard_tracker_receives_the_logged_rows(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    Trainer(load_config(CONFIG, [*args(data, out, 3), "train.trackers=[tensorboard]"])).train()
    events = EventAccumulator(str(out / "logs" / "ace"))  # the run's scalars (hparams go below it)
    events.Reload()
    loss = [e.value for e in events.Scalars("loss")]
    assert loss == pytest.approx(losses(out), rel=1e-6)


def test_fine_tuning_keeps_the_pretrained_objective(data, tmp_path):
    """model.pretrained starts from a pipeline's weights; training it on another objective
    (the default ddpm-eps for a flow model) is refused before any work, and the matching
    one fine-tunes and exports the same kind of scheduler."""
    flow = ["objective.name=rectified-flow", "objective.shift=3.0"]
    first = tmp_path / "first"
    Trainer(load_config(CONFIG, args(data, first, 1, *flow))).train()
    tune = [f"model.pretrained={first / 'pipeline'}"]
    for wrong in ([], ["objective.name=rectified-flow"]):  # ddpm-eps; flow at shift 1
        with pytest.raises(ValueError, match=r"objective.name=rectified-flow objective.shift=3.0"):
            Trainer(load_config(CONFIG, args(data, tmp_path / "wrong", 1, *tune, *wrong)))
    assert not (tmp_path / "wrong").exists()
    Trainer(load_config(CONFIG, args(data, tmp_path / "tuned", 1, *tune, *flow))).train()
    pipe = ACEPipeline.from_pretrained(tmp_path / "tuned" / "pipeline")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0


def test_text_encoder_dtype_casts_the_frozen_encoder_and_the_export_keeps_it(data, tmp_path):
    """model.text_encoder_dtype=bf16 (the released encoder's): a T5 saved in float32 trains
    in bf16, its states those of the saved encoder cast to bf16 by hand, and the exported
    pipeline keeps the bf16 encoder; the same holds from model.pretrained (fp32 back)."""
    from ace import testing
    from ace.conditioning import clean_text

    tokenizer, t5 = testing.tiny_text_encoder()
    t5.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    bf16 = [f"model.text_encoder={tmp_path / 't5'}", "model.text_encoder_dtype=bf16"]
    trainer = Trainer(load_config(CONFIG, args(data, tmp_path / "run", 2, *bf16)))
    assert trainer.conditioner.text_encoder.dtype == torch.bfloat16
    prompt = "make {image} the next colour"
    pad = {"padding": "max_length", "max_length": trainer.conditioner.max_length}
    ids = tokenizer([clean_text(prompt)], return_tensors="pt", **pad)
    with torch.no_grad():
        hidden = t5.to(torch.bfloat16)(**ids).last_hidden_state[0]  # (N, E)
    expected = hidden[: int(ids["attention_mask"].sum())]  # (L, E): the valid tokens
    (states,) = trainer.conditioner.encode_text([prompt])
    assert states.dtype == torch.bfloat16 and torch.equal(states, expected)
    trainer.train()
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))
    pipe = ACEPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.transformer.dtype == torch.float32  # the trained weights stay float32
    tuned = [f"model.pretrained={tmp_path / 'run' / 'pipeline'}", "model.text_encoder_dtype=fp32"]
    trainer = Trainer(load_config(CONFIG, args(data, tmp_path / "tuned", 1, *tuned)))
    assert trainer.conditioner.text_encoder.dtype == torch.float32


def test_fine_tuning_keeps_the_pretrained_indicator_table_and_step_count(data, tmp_path):
    """model.pretrained's stored indicator table is the one its transformer learned with
    (a release's: converted, not recomputed), and its default_steps (50 at 1024 px) are
    how its users sample: the run trains with that table and the export keeps both."""
    from ace.pipeline import IndicatorTable
    from ace.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    table = torch.randn(pipe.indicators.table.shape, generator=torch.Generator().manual_seed(3))
    start = tmp_path / "start"
    ACEPipeline(
        pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
        IndicatorTable.from_table(table), default_steps=50,
    ).save_pretrained(start)  # fmt: skip
    out = tmp_path / "tuned"
    trainer = Trainer(load_config(CONFIG, args(data, out, 1, f"model.pretrained={start}")))
    assert torch.equal(trainer.indicators, table)
    assert not torch.equal(trainer.conditioner.indicator_table(), table)  # not recomputed
    trainer.train()
    tuned = ACEPipeline.from_pretrained(out / "pipeline")
    assert tuned.config.default_steps == 50 and torch.equal(tuned.indicators.table, table)
    # the keys that would build components are named when model.pretrained gives them all
    ignored = ["model.overrides.depth=1", "model.vae=/nowhere/vae", "model.text_encoder=/no/t5"]
    warned = r"model.preset=tiny and model.overrides \(the pretrained depth=2\); model.text_encoder=/no/t5; model.vae=/nowhere/vae are not used"  # fmt: skip
    with pytest.warns(UserWarning, match=warned):
        Trainer(load_config(CONFIG, args(data, tmp_path / "more", 1, f"model.pretrained={start}", *ignored)))  # fmt: skip
    # from scratch: the table comes from the text encoder, and 20 steps
    fresh = Trainer(load_config(CONFIG, args(data, tmp_path / "fresh", 1)))
    assert torch.equal(fresh.indicators, fresh.conditioner.indicator_table())
    assert fresh.default_steps == 20


def test_frozen_encoders_load_whole_on_every_rank(data, tmp_path, monkeypatch):
    """accelerate launch with an FSDP file sets FSDP_CPU_RAM_EFFICIENT_LOADING, under which
    transformers 4.x leaves ranks > 0 uninitialised weights for FSDP to broadcast; frozen
    T5 is never wrapped, so the trainer loads its components with it off (and puts it back)."""
    from transformers import T5EncoderModel

    from ace import testing

    tokenizer, t5 = testing.tiny_text_encoder()
    t5.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    seen = []
    real = T5EncoderModel.from_pretrained.__func__

    def spy(cls, *a, **k):
        seen.append(os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING"))
        return real(cls, *a, **k)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(spy))
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    run = args(data, tmp_path / "run", 1, f"model.text_encoder={tmp_path / 't5'}")
    Trainer(load_config(CONFIG, run))
    assert seen == ["false"] and os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


def test_ema_weights_are_exported(data, tmp_path):
    out = tmp_path / "ema"
    trainer = Trainer(
        load_config(CONFIG, [*args(data, out, 4), "ema.enabled=true", "ema.decay=0.5"])
    )
    trainer.train()
    exported = weights(out)
    names = [n for n, _ in trainer.unwrapped.named_parameters()]
    shadow = dict(zip(names, trainer.ema.shadow_params))
    live = dict(trainer.unwrapped.named_parameters())
    # the export is the EMA, not the live weights
    assert all(torch.equal(exported[n], shadow[n]) for n in names)
    assert any(not torch.equal(exported[n], live[n].detach()) for n in names)


@pytest.mark.parametrize("mode", ["max_tokens", "shards"])
def test_token_budget_and_shard_streams_resume_exactly(data, tmp_path, mode):
    extra = ["data.max_tokens=40"]  # 16 tokens per 64 px frame: 1-2 LCUs per batch
    if mode == "shards":
        from ace.data.shards import write_shards

        write_shards(data, tmp_path / "shards", samples_per_shard=4, progress=False)
        extra = [
            f"data.shards={tmp_path / 'shards' / 'shard-{000000..000003}.tar'}",
            "data.shuffle_buffer=4",
        ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(load_config(CONFIG, args(data, straight, 8, *extra))).train()
    Trainer(load_config(CONFIG, args(data, split, 5, *extra))).train()
    Trainer(load_config(CONFIG, [*args(data, split, 8, *extra), "train.resume=latest"])).train()
    assert losses(straight) == losses(split)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    if mode == "max_tokens":
        assert all(r["tokens"] <= 40 for r in rows) and len({r["tokens"] for r in rows}) > 1


def test_a_kept_toy_vae_trained_otherwise_is_warned(tmp_path):
    """model.vae exists, so it is used as it is; when its training.json records other
    steps or another size than the config asks, the run says so (once, on the main
    process) and leaves it alone."""
    from types import SimpleNamespace

    from ace.train.trainer import ensure_vae
    from ace.train.vae import train_toy_vae

    vae = tmp_path / "vae"
    train_toy_vae(vae, steps=1, n_images=8, eval_images=2, progress=False, size=32)
    before = {p.name: p.stat().st_mtime_ns for p in vae.iterdir()}
    main = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    other = SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: None)
    asked = [f"model.vae={vae}", "data.toy_size=32"]
    with pytest.warns(UserWarning, match=r"1 steps, not 4000 steps\); delete it"):
        ensure_vae(load_config(TOY, [*asked, "model.vae_toy_steps=4000"]), main)
    with pytest.warns(UserWarning, match=r"\(32 px, not 64 px\)"):
        ensure_vae(load_config(TOY, [f"model.vae={vae}", "model.vae_toy_steps=1", "data.toy_size=64"]), main)  # fmt: skip
    with pytest.warns(UserWarning, match=r"\(seed 0, not 7\)"):  # ensure_vae trains with train.seed
        ensure_vae(load_config(TOY, [*asked, "model.vae_toy_steps=1", "train.seed=7"]), main)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_vae(load_config(TOY, [*asked, "model.vae_toy_steps=1"]), main)  # as asked
        ensure_vae(load_config(TOY, [*asked, "model.vae_toy_steps=4000"]), other)
        ensure_vae(load_config(TOY, [*asked, "model.vae_toy_steps=0"]), main)  # not asked
    assert {p.name: p.stat().st_mtime_ns for p in vae.iterdir()} == before
    # every rank meets the barrier, whether it found the VAE there or trained it
    barriers = []
    counted = SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: barriers.append(1))
    ensure_vae(load_config(TOY, [*asked, "model.vae_toy_steps=1"]), counted)
    assert barriers == [1]


def test_a_toy_vae_directory_that_holds_no_vae(tmp_path, monkeypatch):
    """An empty model.vae directory (made ahead, say) is trained into; one holding other
    files but no config.json is refused, naming it, not left to a diffusers OSError."""
    from types import SimpleNamespace

    import ace.train.vae as vae_module
    from ace.train.trainer import ensure_vae

    trained = []
    monkeypatch.setattr(vae_module, "train_toy_vae", lambda out, **kw: trained.append(out))
    main = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, device="cpu")
    (tmp_path / "empty").mkdir()
    ensure_vae(load_config(TOY, [f"model.vae={tmp_path / 'empty'}", "model.vae_toy_steps=1"]), main)  # fmt: skip
    assert trained == [str(tmp_path / "empty")]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"model\.vae=.*junk is there but holds no VAE \(no config\.json\)"):  # fmt: skip
        ensure_vae(load_config(TOY, [f"model.vae={tmp_path / 'junk'}", "model.vae_toy_steps=1"]), main)  # fmt: skip


@pytest.mark.parametrize("mode", ["manifest", "shards"])
def test_token_budget_counts_the_vaes_own_token_size(data, tmp_path, mode):
    """With a factor-4 VAE (the toy geometry) a token is 8 px: a 64 px frame is 64 tokens,
    not the 16 a 16 px count gives, and batches stay within data.max_tokens."""
    from diffusers import AutoencoderKL

    from ace.train.vae import toy_vae_config

    vae = tmp_path / "vae"
    AutoencoderKL(**toy_vae_config(latent_channels=4)).save_pretrained(vae)
    extra = []
    if mode == "shards":
        from ace.data.shards import write_shards

        write_shards(data, tmp_path / "shards", samples_per_shard=4, progress=False)
        extra = [f"data.shards={tmp_path / 'shards' / 'shard-{000000..000003}.tar'}"]
    out = tmp_path / "run"
    # t2i LCUs are 64 tokens and recolours 128: 1-3 per batch (16 px counting packed 4)
    run = args(data, out, 4, f"model.vae={vae}", "data.max_tokens=200", *extra)
    Trainer(load_config(CONFIG, run)).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(64 <= r["tokens"] <= 200 for r in rows), rows


@pytest.mark.parametrize("extra", [["data.max_tokens=64"], ["data.batch_size=2"]])
def test_an_accumulated_step_is_the_mean_over_its_samples(data, tmp_path, extra):
    """With token budgets, micro-batches hold different numbers of samples: the window's
    gradient is still that of the mean loss over all its samples, as one big batch would
    give (reference: the per-sample mean rebuilt from the same micro-batches and draws)."""
    cfg = load_config(CONFIG, args(data, tmp_path / "run", 1, "train.grad_accum=2", "optim.grad_clip=0", *extra))  # fmt: skip
    trainer = Trainer(cfg)
    params = list(trainer.unwrapped.parameters())
    got = []
    trainer.optimizer.step = lambda *a, **k: got.append([p.grad.clone() for p in params])
    trainer.train_step()  # the optimizer "steps" by recording the gradient: weights unchanged
    means, counts = zip(*[trainer.forward_loss(k)[::2] for k in (0, 1)])
    if extra[0].startswith("data.max_tokens"):
        assert counts[0] != counts[1], counts  # the case that matters
    total = sum(m * n for m, n in zip(means, counts)) / sum(counts)
    reference = torch.autograd.grad(total, params)
    for g, r in zip(got[0], reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


BUDGET = "data.max_tokens=40"


@pytest.mark.parametrize("extra, bad, at", [([], 1, 3), ([BUDGET], 1, 3), ([BUDGET], 2, 2)])
def test_a_streamed_image_too_small_to_train_on_is_skipped(tmp_path, extra, bad, at):
    """A shard sample whose image decodes but is too small for a patch is skipped, warned
    and counted, in fixed-size and token-budget batches; resuming counts it as before.
    With the token budget, sample 2 bad and a checkpoint after step 2, the bad sample lies
    between the saved position and the sample read to close the batch: the resumed run
    reads it again, and once counted it twice."""
    from ace.data.shards import write_shards

    lcus = list(solid_lcus(4))
    lcus[bad] = LCU(ConditionUnit("a thin strip"), target=Image.new("RGB", (300, 12)), task="t2i")
    write_manifest(lcus, tmp_path / "data", progress=False)
    write_shards(tmp_path / "data", tmp_path / "shards", samples_per_shard=2, progress=False)
    shards = f"data.shards={tmp_path / 'shards' / 'shard-{000000..000001}.tar'}"
    straight, split = tmp_path / "straight", tmp_path / "split"
    with pytest.warns(UserWarning, match="skipping a streamed sample: .*too small"):
        Trainer(load_config(CONFIG, args(tmp_path, straight, 6, shards, "data.batch_size=2", *extra))).train()  # fmt: skip
        Trainer(load_config(CONFIG, args(tmp_path, split, at, shards, "data.batch_size=2", f"train.checkpoint_every={at}", *extra))).train()  # fmt: skip
        Trainer(load_config(CONFIG, [*args(tmp_path, split, 6, shards, "data.batch_size=2", *extra), "train.resume=latest"])).train()  # fmt: skip
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and not any(r["skipped_step"] for r in rows)
    assert rows[-1]["skipped_samples"] >= 2  # once per pass over the 4 samples
    resumed = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in resumed] == [r["skipped_samples"] for r in rows]
    assert losses(straight) == losses(split)


def test_embedding_cache_trains_like_the_encoders(data, tmp_path):
    """data.cache: built on first use, then the same losses as encoding every step."""
    live, cached = tmp_path / "live", tmp_path / "cached"
    Trainer(load_config(CONFIG, args(data, live, 4))).train()
    cache = tmp_path / "emb"
    Trainer(load_config(CONFIG, [*args(data, cached, 4), f"data.cache={cache}"])).train()
    assert (cache / "cache.json").is_file()
    np.testing.assert_allclose(losses(cached), losses(live), rtol=1e-4)
    with pytest.raises(ValueError, match=r"data\.shards"):
        load_config(CONFIG, [*args(data, cached, 4), f"data.cache={cache}", "data.shards=x.tar"])


def test_with_a_cache_the_encoders_leave_the_accelerator_and_train_no_step(data, tmp_path):
    """Once data.cache is built a training step needs neither T5 nor the VAE (the export
    saves them, and the pipeline it makes encodes its indicator table): they go to the CPU
    (on a GPU the released T5-XXL would hold 19 GB), and a step that ran either fails."""
    trainer = Trainer(
        load_config(CONFIG, [*args(data, tmp_path / "run", 3), f"data.cache={tmp_path / 'c'}"])
    )
    conditioner = trainer.conditioner
    encoders = (conditioner.text_encoder, conditioner.vae)
    assert {p.device.type for m in encoders for p in m.parameters()} == {"cpu"}

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran in a training step with a cache")

    patched = [(m, name) for m in encoders for name in ("forward", "encode", "decode")]
    for m, name in patched:
        setattr(m, name, refuse)
    rows = [trainer.train_step() for _ in range(3)]
    assert all(math.isfinite(r["loss"]) for r in rows)
    for m, name in patched:
        if name in vars(m):
            delattr(m, name)
    ACEPipeline.from_pretrained(trainer.export())
