"""Converts a whole Wan checkpoint folder between the official and the diffusers layout.

    python scripts/convert_checkpoint.py --task t2v --src Wan2.1-T2V-1.3B --dst Wan2.1-T2V-1.3B-Diffusers --to diffusers
    python scripts/convert_checkpoint.py --task t2v --src Wan2.1-T2V-1.3B-Diffusers --dst Wan2.1-T2V-1.3B --to official
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.folder_convert import diffusers_to_official, official_to_diffusers  # noqa: E402
from pipelines.loading import TASK_PRESETS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASK_PRESETS))
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--to", required=True, choices=["official", "diffusers"])
    args = parser.parse_args()
    convert = official_to_diffusers if args.to == "diffusers" else diffusers_to_official
    convert(args.src, args.dst, args.task)
    print(f"wrote the {args.to} layout of {args.src} to {args.dst}")


if __name__ == "__main__":
    main()
