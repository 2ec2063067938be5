"""Times our Wan VAEs against diffusers' `AutoencoderKLWan` holding the same (random) weights.

    python scripts/bench_vae.py                      # both VAEs, 9 frames of 64x64, fp32, 2 threads
    python scripts/bench_vae.py --versions 2.1 --size 128 --repeats 5
    python scripts/bench_vae.py --size 256 --tile 128   # also ours with spatial tiling

After a warm-up call each, encode and decode of both implementations run interleaved, `--repeats`
times; the best time is reported (the least disturbed by other work on the machine), with the
median beside it, and the ratio of the best CPU times (less sensitive to other processes than wall
time). Peak memory is the rise of the resident set's high-water mark over the call (Linux: the mark
is reset before the call), measured in a fresh process per measurement so that memory one call
freed but the allocator kept cannot serve the next. The outputs are checked to agree.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan.convert_vae import VAE_CLASSES, diffusers_config, vae_to_diffusers  # noqa: E402

IMPLS = ("ours", "diffusers")


def build(impl, version, seed=0):
    """Our VAE with seeded random weights, or diffusers' with the same weights."""
    torch.manual_seed(seed)
    ours = VAE_CLASSES[version]().eval()
    if impl == "ours":
        return ours
    from diffusers import AutoencoderKLWan

    theirs = AutoencoderKLWan(**diffusers_config(version)).eval()
    theirs.load_state_dict(vae_to_diffusers(ours.state_dict()))
    return theirs


def inputs(vae, args):
    """A video in [-1, 1] and normalized latents of its shape for our VAE."""
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, args.frames, args.size, args.size, generator=g) * 2 - 1
    s, t = vae.spatial_stride, vae.temporal_stride
    latents = torch.randn(1, vae.z_dim, (args.frames - 1) // t + 1, args.size // s, args.size // s, generator=g)
    return video, latents


def operations(impl, vae, ours, tile=0):
    """encode(video) -> normalized latents and decode(normalized latents) -> clamped video, for both
    implementations; diffusers works on unnormalized latents, so its calls convert. With `tile`
    (pixels), ours also has tiled variants (overlap: a quarter tile, in whole latent pixels)."""
    if impl == "ours":
        ops = {"encode": vae.encode, "decode": vae.decode}
        if tile:
            stride = vae.spatial_stride
            tiling = dict(tiled=True, tile_size=tile, tile_overlap=tile // 4 // stride * stride)
            ops.update({"encode tiled": lambda video: vae.encode(video, **tiling),
                        "decode tiled": lambda latents: vae.decode(latents, **tiling)})
        return ops
    mean, std = ours.latents_mean.view(1, -1, 1, 1, 1), ours.latents_std.view(1, -1, 1, 1, 1)
    return {"encode": lambda video: (vae.encode(video).latent_dist.mode() - mean) / std,
            "decode": lambda latents: vae.decode(latents * std + mean).sample}


def memory_status(field):
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure_memory(args):
    """Child process: peak RSS rise (bytes) of one call, printed as JSON."""
    torch.set_num_threads(args.threads)
    ours = VAE_CLASSES[args.version]().eval()
    vae = ours if args.impl == "ours" else build(args.impl, args.version)
    video, latents = inputs(ours, args)
    op = operations(args.impl, vae, ours, args.tile)[args.op]
    arg = video if args.op.startswith("encode") else latents
    del ours
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, so building the models does not count
    before = memory_status("VmRSS")
    with torch.no_grad():
        op(arg)
    print(json.dumps({"peak_rise": memory_status("VmHWM") - before}))


def child_memory(version, impl, op, args):
    cmd = [sys.executable, __file__, "--child", "--version", version, "--impl", impl, "--op", op,
           "--frames", str(args.frames), "--size", str(args.size), "--threads", str(args.threads),
           "--tile", str(args.tile)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rise"]


def timed(fn, arg):
    """fn(arg), its wall-clock seconds and the CPU seconds of this process (all threads) it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(arg)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_version(version, args):
    models = {impl: build(impl, version) for impl in IMPLS}
    video, latents = inputs(models["ours"], args)
    ops = {impl: operations(impl, models[impl], models["ours"], args.tile) for impl in IMPLS}
    walls, cpus, results = {}, {}, {}
    runs = [(op, arg, impl) for op, arg in (("encode", video), ("decode", latents)) for impl in IMPLS]
    tiled = [(op, arg, "ours") for op, arg in (("encode tiled", video), ("decode tiled", latents))] if args.tile else []
    with torch.no_grad():
        for op, arg, impl in runs:  # warm-up: oneDNN builds its kernels on the first call of each shape
            ops[impl][op](arg)
        for op, arg, impl in runs * args.repeats + tiled:
            results[impl, op], wall, cpu = timed(ops[impl][op], arg)
            walls.setdefault((impl, op), []).append(wall)
            cpus.setdefault((impl, op), []).append(cpu)
    del models
    print(f"\nWan{version} VAE, video 1x3x{args.frames}x{args.size}x{args.size}, fp32, "
          f"{args.threads} threads, best (median) of {args.repeats}")
    print(f"{'':8}{'ours s':>16}{'diffusers s':>18}{'ratio':>8}{'cpu ratio':>11}{'ours MiB':>10}"
          f"{'diffusers MiB':>15}{'max |diff|':>12}")
    for op in ("encode", "decode"):
        best = {impl: min(walls[impl, op]) for impl in IMPLS}
        median = {impl: statistics.median(walls[impl, op]) for impl in IMPLS}
        cpu_ratio = min(cpus["diffusers", op]) / min(cpus["ours", op])
        memory = {impl: child_memory(version, impl, op, args) / 2**20 for impl in IMPLS}
        diff = (results["ours", op] - results["diffusers", op]).abs().max().item()
        print(f"{op:8}{best['ours']:>8.2f} ({median['ours']:5.2f}){best['diffusers']:>10.2f} "
              f"({median['diffusers']:5.2f}){best['diffusers'] / best['ours']:>7.2f}x{cpu_ratio:>10.2f}x"
              f"{memory['ours']:>10.0f}{memory['diffusers']:>15.0f}{diff:>12.1e}")
    for op, _, _ in tiled:
        # differs from the whole-frame result at the seams, hence the mean rather than the max
        diff = (results["ours", op] - results["ours", op.split()[0]]).abs().mean().item()
        print(f"{op:13} ours, {args.tile}px tiles: {walls['ours', op][0]:.2f} s, "
              f"{child_memory(version, 'ours', op, args) / 2**20:.0f} MiB, mean |diff| to whole frames {diff:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", default=["2.1", "2.2"], choices=sorted(VAE_CLASSES))
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=0, help="also time ours with tiles of this many pixels")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_memory(args)
    torch.set_num_threads(args.threads)
    print("ratio = diffusers time / ours (above 1: ours is faster), of wall and of CPU time; "
          "MiB = peak memory rise during the call")
    for version in args.versions:
        bench_version(version, args)


if __name__ == "__main__":
    main()
