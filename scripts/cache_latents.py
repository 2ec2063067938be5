"""Encode a video dataset once, so training reads latents and text embeddings instead of running
the VAE and umT5 (set `data.kind=latents data.path=<output_dir>` in the training config).

    python scripts/cache_latents.py --config_path configs/t2v_1.3B_finetune.yaml --output_dir data/latents \
        data.kind=videos data.path=data/videos
    torchrun --nproc_per_node 8 scripts/cache_latents.py ...    # each process encodes every N-th sample

Uses the config's `data` (kind videos or json, frames, size, buckets) and `encoders` sections.
Each sample becomes <output_dir>/NNNNNN.safetensors with `latents` [C, F, h, w], `context` [L, 4096],
and `y` / `clip_fea` for image-to-video models; its caption and source file in the metadata.
Unreadable samples are reported and skipped.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.config import ConfigError, dit_config, load_config, trainer_class  # noqa: E402
from trainers.data import build_dataset  # noqa: E402
from trainers.encoders import Encoders  # noqa: E402
from wan.checkpoint import save_state_dict  # noqa: E402

log = logging.getLogger("cache_latents")


def cache_latents(cfg, output_dir, rank=0, world_size=1, device="cpu"):
    """Encodes samples rank, rank + world_size, ... of the config's dataset; returns (written, skipped)."""
    trainer = trainer_class(cfg.trainer)
    if hasattr(trainer, "dataset"):  # e.g. multiref: its samples carry more than a video and a caption
        raise ConfigError(f"trainer {cfg.trainer} reads its own dataset and caches its encodings itself "
                          f"(multiref: cache_latents = true in the dataset TOML); this script does not apply")
    if cfg.data.kind not in ("videos", "json"):
        raise ConfigError(f"cache_latents encodes raw data: data.kind must be videos or json, not {cfg.data.kind}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    encoders = Encoders(cfg, dit_config(cfg.model), torch.device(device))
    dataset = build_dataset(cfg.data, cfg.seed)
    written = skipped = 0
    for index in range(rank, len(dataset), world_size):
        try:
            sample = dataset.load(index, epoch=0)
        except Exception as e:  # any decoding error: report and go on
            log.warning("skipping unreadable sample %s: %s: %s", dataset.describe(index), type(e).__name__, e)
            skipped += 1
            continue
        encoded = encoders({"video": sample["video"][None], "text": [sample["text"]]})
        tensors = {"latents": encoded["latents"][0], "context": encoded["context"][0]}
        if "y" in encoded:
            tensors["y"] = encoded["y"][0]
        if "clip_fea" in encoded:  # [frames given, 257, 1280] -> one entry per sample
            tensors["clip_fea"] = encoded["clip_fea"].flatten(0, -2)
        save_state_dict({k: v.float() for k, v in tensors.items()}, output_dir / f"{index:06d}.safetensors",
                        metadata={"text": sample["text"], "source": dataset.describe(index)})
        written += 1
    log.info("rank %d: wrote %d latent files to %s, skipped %d unreadable sample(s)", rank, written, output_dir,
             skipped)
    return written, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config_path, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    cache_latents(cfg, args.output_dir, rank, world_size, device)


if __name__ == "__main__":
    main()
