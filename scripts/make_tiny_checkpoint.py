"""Writes a complete tiny random-weight Wan checkpoint folder (official layout by default).

    python scripts/make_tiny_checkpoint.py --task t2v --output_dir tiny_checkpoints/t2v
    python scripts/make_tiny_checkpoint.py --task i2v-A14B --output_dir DIR --format diffusers
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.extensions import extension_tasks  # noqa: E402
from pipelines.loading import TASK_PRESETS  # noqa: E402
from pipelines.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from pipelines.folder_convert import official_to_diffusers  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    extensions = {name: task for name, task in extension_tasks().items() if task.make_tiny}
    parser.add_argument("--task", required=True, choices=sorted(TASK_PRESETS) + sorted(extensions))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--format", default="official", choices=["official", "diffusers"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.task in extensions:
        if args.format != "official":
            parser.error(f"--task {args.task} writes its own layout; drop --format")
        extensions[args.task].make_tiny(Path(args.output_dir), args.seed)
        print(f"wrote a tiny {args.task} checkpoint to {args.output_dir}")
        return
    if args.format == "official":
        make_tiny_checkpoint(args.task, args.output_dir, args.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            official_to_diffusers(make_tiny_checkpoint(args.task, tmp, args.seed), args.output_dir, args.task)
    print(f"wrote a tiny {args.task} checkpoint ({args.format} layout) to {args.output_dir}")


if __name__ == "__main__":
    main()
