"""``python -m treerpo.train``: TreeRPO (or GRPO) on the embedded default or your model and data."""
from __future__ import annotations

import sys

from .config import ConfigError, parse_args


def main(argv=None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .trainer import Trainer

    trainer = Trainer(config)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    print(f"{summary['algo']}: held-out accuracy {summary['initial_eval_accuracy']:.3f} -> "
          f"{summary['final_eval_accuracy']:.3f} in {summary['steps']} steps, {summary['wall_time_s']:.0f} s; "
          f"outputs in {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
