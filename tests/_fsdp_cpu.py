"""scripts/train.py's Trainer under real FSDP on CPU processes, for the tests.

accelerate turns FSDP on for GPU processes only (MULTI_CPU ignores it), yet torch's FSDP1
runs on CPU over gloo. Under ``torchrun --nproc_per_node 2`` this makes the Accelerator as
usual and then switches it to FSDP with configs/accelerate/fsdp.yaml's settings (FULL_SHARD,
one unit per ACEBlock, sharded state dicts, use_orig_params), so the trainer's FSDP paths
run with each rank holding half of every unit. Three things differ from a GPU run, each
forced by the CPU: no ``sync_module_states`` (accelerate asks a GPU for it; every rank
builds the same weights from the seed anyway), the device ``cpu`` (accelerate's ``cpu:0``
fails FSDP's device check), and the export's gather without ``offload_to_cpu`` (on CPU
tensors it hands back freed memory: a segfault).

    torchrun --nproc_per_node 2 tests/_fsdp_cpu.py CONFIG key=value ...

It also writes OUTPUT/timestep_dtypes.json: the dtypes the timesteps reached the model in.
"""

import sys

import accelerate
import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


class CPUFSDPAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["ACEBlock"],
            sharding_strategy="FULL_SHARD",
            state_dict_type="SHARDED_STATE_DICT",
            backward_prefetch="BACKWARD_PRE",
            use_orig_params=True,
            sync_module_states=False,
            cpu_ram_efficient_loading=False,
        )
        if self.state.mixed_precision != "no":  # as accelerate does for an FSDP state
            self.state.fsdp_plugin.set_mixed_precision(self.state.mixed_precision)

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def distributed_type(self):
        return DistributedType.FSDP

    def get_state_dict(self, model, unwrap=True):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            return model.state_dict()


if __name__ == "__main__":
    import json

    import ace.train.trainer as trainer
    from ace.train import load_config

    trainer.Accelerator = CPUFSDPAccelerator
    run = trainer.Trainer(load_config(sys.argv[1], sys.argv[2:]))
    seen = []  # the dtype the timesteps reach the model's embedder in, for the tests
    run.unwrapped.t_embedder.register_forward_pre_hook(lambda m, a: seen.append(str(a[0].dtype)))
    run.train()
    if run.accelerator.is_main_process:
        (run.out / "timestep_dtypes.json").write_text(json.dumps(sorted(set(seen))))
