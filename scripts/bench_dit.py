"""Times a WanModel forward against diffusers' WanTransformer3DModel with the same weights.

    python scripts/bench_dit.py [--dim 512 --layers 4 --grid 8 32 32 --threads 2 --repeats 5]

Both models run the same inputs in the same process (fp32 by default); the script checks the
outputs agree and prints the median times and the ratio ours / diffusers (below 1 = we are faster).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan.convert.dit_diffusers import config_to_diffusers, dit_to_diffusers  # noqa: E402
from wan.modules.model import WanModel  # noqa: E402


def interleaved_medians(fns, repeats, warmup=1):
    """Median wall time of each function, runs alternating so that load on the machine hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--grid", type=int, nargs=3, default=(8, 32, 32), help="latent F H W (tokens = F*H*W/4)")
    parser.add_argument("--text_tokens", type=int, default=64, help="prompt length before padding to 512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    from diffusers import WanTransformer3DModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = dict(model_type="t2v", dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.heads,
                  num_layers=args.layers, text_dim=4096, freq_dim=256)
    ours = WanModel(**config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    theirs = WanTransformer3DModel(**config_to_diffusers(config)).eval()
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    ours.to(args.device, dtype)
    theirs.to(args.device, dtype)

    x = torch.randn(1, 16, *args.grid, device=args.device)
    t = torch.tensor([500.0], device=args.device)
    context = torch.zeros(1, 512, 4096, device=args.device)
    context[:, :args.text_tokens] = torch.randn(1, args.text_tokens, 4096)
    tokens = args.grid[0] * args.grid[1] * args.grid[2] // 4

    def run_ours():
        with torch.no_grad():
            return ours(x, t, context[:, :args.text_tokens])

    def run_theirs():
        with torch.no_grad(), torch.autocast(args.device, dtype, enabled=dtype != torch.float32):
            return theirs(x.to(dtype), t, context.to(dtype), return_dict=False)[0]

    error = (run_ours() - run_theirs().float()).abs().max().item()
    t_ours, t_theirs = interleaved_medians([run_ours, run_theirs], args.repeats)
    print(f"DiT forward, dim {args.dim}, {args.layers} layers, {tokens} tokens, {args.dtype}, "
          f"{args.device}, {args.threads} threads (max abs diff {error:.2e})")
    print(f"  ours      {t_ours * 1000:8.1f} ms")
    print(f"  diffusers {t_theirs * 1000:8.1f} ms")
    print(f"  ratio ours/diffusers: {t_ours / t_theirs:.3f}")


if __name__ == "__main__":
    main()
