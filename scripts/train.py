#!/usr/bin/env python
"""Train ACE: one process on a CPU, or many through torchrun / accelerate launch.

    python scripts/train.py --config configs/toy.yaml    # the demo's model (~10 min on 2 cores)
    python scripts/train.py --config configs/tiny.yaml train.max_steps=8 train.output_dir=outputs/try
    python scripts/train.py --config configs/tiny.yaml train.output_dir=outputs/try train.resume=latest
    torchrun --nproc_per_node 2 scripts/train.py --config configs/tiny.yaml   # 2 CPU processes (gloo)
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py --config ...

Every key of ace/train/config.py can be set as key=value after --config.
"""

from __future__ import annotations

import sys

from ace.cli import HelpFormatter, OneLineParser


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--config", required=True, help="a YAML file of overrides of the config dataclasses"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = p.parse_args(argv)
    from ace.train import Trainer, load_config
    from ace.train.trainer import TrainingStopped

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        out = trainer.train()
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    if trainer.accelerator.is_main_process:
        skipped = trainer.skipped_total
        if skipped:  # the warnings scroll by with the bar: say it once more at the end
            print(f"train.py: {skipped} sample(s) skipped as unreadable or too small (warned)")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
