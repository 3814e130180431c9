"""scripts/train.py's Trainer under real FSDP on CPU processes, for the tests.

accelerate turns FSDP on for GPU processes only (MULTI_CPU ignores it), yet torch's FSDP1
and FSDP2 run on CPU over gloo. Under ``torchrun --nproc_per_node 2`` this makes the
Accelerator as usual and then switches it to FSDP with the ``fsdp_config`` of
configs/accelerate/fsdp.yaml (read from the file: FULL_SHARD, one unit per ACEBlock,
sharded state dicts, use_orig_params) or of another file (``--file``: fsdp2.yaml), so the
trainer's FSDP paths run with each rank holding half of every unit. Preparing the model,
saving and loading state and clipping are accelerate's own code. What differs from a GPU
run, each forced by the CPU:

- the device is ``cpu`` (accelerate's ``cpu:0`` fails FSDP's device check);
- FSDP1 only: ``sync_module_states`` and ``cpu_ram_efficient_loading`` are off (accelerate
  asks a GPU for them; every rank builds the same weights from the seed anyway), and the
  export gathers without ``offload_to_cpu`` (on CPU tensors it hands back freed memory, a
  segfault) and on every rank (accelerate's gives the main process alone the weights,
  which is all the export reads).

    CUDA_VISIBLE_DEVICES= torchrun --nproc_per_node 2 tests/_fsdp_cpu.py [--file ACCELERATE_FILE] CONFIG key=value ...

It also writes OUTPUT/timestep_dtypes.json: the dtypes the timesteps reached the model in.
"""

import sys
from pathlib import Path

import accelerate
import torch
import yaml
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
CPU_OFF = {"fsdp_sync_module_states": False, "fsdp_cpu_ram_efficient_loading": False}


def plugin_from_file(path: Path) -> FullyShardedDataParallelPlugin:
    """The accelerate file's fsdp_config as a plugin (accelerate launch passes it to the
    processes as FSDP_* variables; the plugin's fields are the keys without ``fsdp_``)."""
    settings = yaml.safe_load(path.read_text())["fsdp_config"]
    if settings.get("fsdp_version", 1) == 1:  # FSDP2's loading runs on CPU as it is
        settings.update(CPU_OFF)
    fields = {
        "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
        "fsdp_offload_params": "cpu_offload",
        "fsdp_version": "fsdp_version",
    }
    kwargs = {fields.get(k, k.removeprefix("fsdp_")): v for k, v in settings.items()}
    if isinstance(kwargs.get("transformer_cls_names_to_wrap"), str):
        kwargs["transformer_cls_names_to_wrap"] = [kwargs["transformer_cls_names_to_wrap"]]
    kwargs["auto_wrap_policy"] = kwargs["auto_wrap_policy"].lower()
    return FullyShardedDataParallelPlugin(**kwargs)


class CPUFSDPAccelerator(accelerate.Accelerator):
    config_file = ACCELERATE / "fsdp.yaml"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state.fsdp_plugin = plugin_from_file(self.config_file)
        if self.state.mixed_precision != "no":  # as accelerate does for an FSDP state
            self.state.fsdp_plugin.set_mixed_precision(self.state.mixed_precision)

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def distributed_type(self):
        return DistributedType.FSDP

    @property
    def is_fsdp2(self):
        return self.state.fsdp_plugin.fsdp_version == 2

    def get_state_dict(self, model, unwrap=True):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self.is_fsdp2:  # accelerate's own runs on CPU
            return super().get_state_dict(model, unwrap)
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            return model.state_dict()


if __name__ == "__main__":
    import json

    import ace.train.trainer as trainer
    from ace.train import load_config

    args = sys.argv[1:]
    if args[0] == "--file":  # another accelerate file than fsdp.yaml (fsdp2.yaml)
        CPUFSDPAccelerator.config_file, args = Path(args[1]), args[2:]
    trainer.Accelerator = CPUFSDPAccelerator
    run = trainer.Trainer(load_config(args[0], args[1:]))
    seen = []  # the dtype the timesteps reach the model's embedder in, for the tests
    run.unwrapped.t_embedder.register_forward_pre_hook(lambda m, a: seen.append(str(a[0].dtype)))
    run.train()
    if run.accelerator.is_main_process:
        (run.out / "timestep_dtypes.json").write_text(json.dumps(sorted(set(seen))))
