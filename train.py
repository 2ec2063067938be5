"""Train a Wan model.

    python train.py --config_path configs/t2v_1.3B_lora.yaml --logdir runs/lora [key=value ...]
    torchrun --nproc_per_node 8 train.py --config_path configs/t2v_1.3B_finetune.yaml --logdir runs/ft
    torchrun --nproc_per_node 8 train.py --config_path ... --logdir runs/ft --resume    # newest checkpoint

The config (YAML or TOML) is merged over configs/default_config.yaml, then the dotted overrides
over that (e.g. optimizer.lr=2e-5 train.max_steps=500); it is validated before any work starts.
"""

import argparse
import logging
import os
import sys

from trainers.config import ConfigError, load_config
from trainers.loop import train


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="training config, .yaml or .toml")
    parser.add_argument("--logdir", help="folder for checkpoints, metrics.jsonl and config.yaml "
                                         "(default: the config's output_dir)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the newest checkpoint in logdir, or from the given checkpoint folder")
    parser.add_argument("--disable-wandb", action="store_true", help="force logging.wandb off")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + (["logging.wandb=false"] if args.disable_wandb else [])
    try:
        cfg = load_config(args.config_path, overrides, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    logdir = args.logdir or cfg.output_dir
    if logdir is None:
        sys.exit("error: give --logdir or set output_dir in the config")
    train(cfg, logdir, args.resume)


if __name__ == "__main__":
    main()
