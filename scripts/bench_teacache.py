"""TeaCache speed-up and fidelity on a tiny model: the sampling loop of `WanVideoPipeline` with and
without TeaCache, same weights, prompt and seed.

    python scripts/bench_teacache.py [--dim 256 --layers 4 --steps 20 --thresholds 0.05 0.1 0.2 --threads 2]

The DiT is a random t2v model (its time projection bias shifted, as in the golden trace, so the
timestep embedding changes between steps in the range the rescaling polynomial was fitted on);
the decoder is skipped, so times are the sampling loop's. PSNR compares the cached latents with the
plain sampler's (peak = the plain latents' max |value|). `run()` returns the rows for a benchmark suite.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.loading import load_components  # noqa: E402
from pipelines.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from pipelines.wan_video import SampleSettings, WanVideoPipeline  # noqa: E402
from wan.modules.model import WanModel  # noqa: E402
from wan.teacache import COEFFICIENTS, TeaCache  # noqa: E402


def psnr(actual, reference):
    mse = (actual - reference).pow(2).mean()
    return float("inf") if mse == 0 else (10 * torch.log10(reference.abs().max() ** 2 / mse)).item()


def tiny_components(folder, dim, layers, seed=0):
    components = load_components(make_tiny_checkpoint("t2v", folder), "t2v")
    torch.manual_seed(seed)
    dit = WanModel(model_type="t2v", dim=dim, ffn_dim=2 * dim, num_heads=max(dim // 64, 1), num_layers=layers,
                   freq_dim=32, text_dim=components.dit.text_embedding[0].in_features, text_len=32).eval()
    with torch.no_grad():
        dit.time_projection[1].bias += 5 * torch.randn(dit.time_projection[1].bias.shape)
    components.dit = dit.requires_grad_(False)
    components.vae.decode = lambda latent, tiled=False: latent
    return components


def run(dim=256, layers=4, steps=20, thresholds=(0.05, 0.1, 0.2), skip_start_steps=2, size="64*64", frame_num=9,
        repeats=3, coefficients="wan2.1-i2v-14b-720p"):
    """Rows {threshold, computed_steps, seconds, speedup, psnr_db}; threshold None is the plain sampler."""
    with tempfile.TemporaryDirectory() as tmp:
        components = tiny_components(Path(tmp) / "t2v", dim, layers)
    settings = SampleSettings(size=size, frame_num=frame_num, sample_steps=steps, seed=0)
    configs = [None] + list(thresholds)
    caches = {th: TeaCache(COEFFICIENTS[coefficients], num_steps=steps, threshold=th,
                           skip_start_steps=skip_start_steps) for th in thresholds}
    pipelines = {th: WanVideoPipeline(components, teacache=caches.get(th)) for th in configs}
    outputs, times = {}, {th: [] for th in configs}
    for _ in range(repeats):  # interleaved, so machine load hits every configuration alike
        for th in configs:
            start = time.perf_counter()
            outputs[th] = pipelines[th].generate("a lighthouse in a storm", settings=settings, progress=False)
            times[th].append(time.perf_counter() - start)
    plain = statistics.median(times[None])
    rows = []
    for th in configs:
        seconds = statistics.median(times[th])
        computed = steps if th is None else sum(r["computed"] for r in caches[th].trace[-steps:])
        rows.append(dict(threshold=th, computed_steps=computed, seconds=seconds, speedup=plain / seconds,
                         psnr_db=psnr(outputs[th], outputs[None])))
    print(f"TeaCache on a tiny t2v DiT (dim {dim}, {layers} layers, {size}x{frame_num}, {steps} steps, "
          f"{coefficients} coefficients, first {skip_start_steps} steps always run)")
    print("| threshold | steps run | sampling s | speed-up | PSNR vs plain (dB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        label = "plain" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"| {label} | {r['computed_steps']}/{steps} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
              f"{r['psnr_db']:.1f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--skip_start_steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args.dim, args.layers, args.steps, tuple(args.thresholds), args.skip_start_steps, repeats=args.repeats)


if __name__ == "__main__":
    main()
