"""Per-block latency and peak memory of causal generation with the KV cache, against recomputing.

    python scripts/bench_causal.py                  # small CPU model, 4 / 16 / 64 blocks, rolling window
    python scripts/bench_causal.py --device cuda    # Wan2.1-T2V-1.3B at 832x480, random weights, bf16

The cached path is `CausalPipeline.few_step` (4 steps and the context rerun per block) with a rolling
window, so its time and memory per block should stay flat however many blocks came before. Its peer,
measured in the same run on the same noise, is the eager path without a cache: each denoising step
runs the block-causal forward over the whole video so far (finished frames at t = 0, the new block at
t), which computes the same blocks (the script prints the largest difference) at a cost that grows
with the video. Latency of block n is the median of blocks n-3..n; peak memory is the high-water mark
up to block n above the level at the start (CUDA: allocated tensors; CPU: resident set). With
`--device cuda` it also reports frames per second of a 21-latent-frame (81-frame) video with an
unbounded cache as Self-Forcing runs it, with and without streaming VAE decoding.
"""

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.causal import CausalPipeline  # noqa: E402
from wan.configs import PRESETS  # noqa: E402
from wan.modules.causal_model import CausalWanModel  # noqa: E402
from wan.modules.model import WanModel  # noqa: E402
from wan.modules.vae2_1 import WanVAE21  # noqa: E402
from wan.modules.vae_streaming import StreamingDecoder  # noqa: E402

SMALL = dict(model_type="t2v", dim=128, ffn_dim=256, num_heads=4, num_layers=4, text_dim=64, freq_dim=64)


class PeakMemory:
    """High-water mark of memory since `reset()`, in bytes above the level at the reset."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set (VmHWM)
                f.write("5")
            self.base = self._status("VmRSS")

    def peak(self):
        return (torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")) - self.base

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def recompute_blocks(causal, sampler, context, num_frames, latent_size, generator):
    """The no-cache peer: yields the same blocks as `CausalPipeline.generate`, running every step over
    the whole video so far under the block-causal mask. Draws noise in the pipeline's order."""
    device = causal.model.device
    video = torch.empty(1, causal.model.in_dim, 0, *latent_size, device=device)
    with torch.no_grad():
        for size in causal.block_sizes(num_frames):
            x = torch.randn(1, causal.model.in_dim, size, *latent_size, generator=generator, device=device)
            sampler.reset()
            for i, t in enumerate(sampler.timesteps):
                per_frame = torch.cat([torch.zeros(video.shape[2]), torch.full((size,), float(t))]).to(device)
                flow = causal(torch.cat([video, x], dim=2), per_frame[None], context)[:, :, -size:]
                x = sampler.step(flow, i, x, generator=generator)
            video = torch.cat([video, x], dim=2)
            yield x


def measure(blocks, checkpoints, video, device):
    """Runs a block generator, copying the blocks into `video` [B, C, F, h, w] (allocated by the caller,
    so it is not counted); per checkpoint n: (latency of block n in s, peak bytes up to block n)."""
    memory = PeakMemory(device)
    memory.reset()
    times, peaks, frame = [], [], 0
    start = time.perf_counter()
    for block in blocks:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - start)
        peaks.append(memory.peak())
        video[:, :, frame:frame + block.shape[2]] = block
        frame += block.shape[2]
        start = time.perf_counter()
    return {n: (statistics.median(times[max(0, n - 4):n]), peaks[n - 1]) for n in checkpoints}


def build(args, device):
    """(causal model, context, latent size)."""
    torch.manual_seed(0)
    if device.type == "cuda":
        with device:
            model = WanModel(**PRESETS["t2v-1.3B"].dit).to(torch.bfloat16).eval()
        context = torch.randn(1, 64, 4096, device=device)
        latent_size = (480 // 8, 832 // 8)
    else:
        model = WanModel(**SMALL).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        context = torch.randn(1, 16, SMALL["text_dim"])
        latent_size = tuple(args.latent_size)
    causal = CausalWanModel(model, num_frame_per_block=3, local_attn_size=args.window)
    return causal, context, latent_size


def rolling_window_table(args, causal, context, latent_size, device):
    sizes = sorted(args.blocks)
    frames = 3 * sizes[-1]
    tokens_per_frame = latent_size[0] * latent_size[1] // 4
    pipe = CausalPipeline.few_step(causal, args.steps)
    for warmup in (pipe.generate(context, 6, latent_size),  # first calls pay for allocation and kernel choice
                   recompute_blocks(causal, pipe.sampler, context, 6, latent_size, None)):
        list(warmup)
    # The peer's float mask over the whole video is (frames * tokens)^2 * 4 bytes: stop where it will not fit.
    feasible = [n for n in sizes if (3 * n * tokens_per_frame) ** 2 * 4 <= args.max_mask_gib * 2**30]
    peer_frames = 3 * feasible[-1] if feasible else 0
    videos = [torch.zeros(1, causal.model.in_dim, n, *latent_size) for n in (frames, peer_frames)]
    cached = measure(pipe.generate(context, frames, latent_size, generator=torch.Generator(device).manual_seed(0)),
                     sizes, videos[0], device)
    peer = measure(recompute_blocks(causal, pipe.sampler, context, peer_frames, latent_size,
                                    torch.Generator(device).manual_seed(0)), feasible, videos[1], device)
    diff = (videos[0][:, :, :peer_frames] - videos[1]).abs().amax().item() if peer_frames else float("nan")

    print(f"causal few-step generation: {len(causal.model.blocks)} layers, dim {causal.model.dim}, "
          f"{tokens_per_frame} tokens/frame, 3 frames/block, {len(args.steps)} steps + context rerun, "
          f"window {args.window} frames, {causal.model.dtype}, {device} "
          f"(max |cached - recomputed| {diff:.1e})")
    cache_bytes = 2 * len(causal.model.blocks) * args.window * tokens_per_frame * causal.model.dim * \
        causal.model.dtype.itemsize
    print(f"kv cache: {cache_bytes / 2**20:.1f} MiB at most (keys and values of {args.window} frames, every layer)")
    print(f"{'blocks':>6} | {'kv cache ms/block':>17} {'peak MiB':>9} | {'recompute ms/block':>18} {'peak MiB':>9} "
          f"| speedup vs recompute")
    for n in sizes:
        c_time, c_mem = cached[n]
        row = f"{n:>6} | {c_time * 1e3:>17.1f} {c_mem / 2**20:>9.1f} | "
        if n in peer:
            p_time, p_mem = peer[n]
            row += f"{p_time * 1e3:>18.1f} {p_mem / 2**20:>9.1f} | {p_time / c_time:.1f}x"
        else:
            row += f"{'(mask too large)':>28} |"
        print(row)
    first, last = cached[sizes[0]], cached[sizes[-1]]
    print(f"expected shape: cached cost per block flat in the number of blocks (window {args.window} frames); "
          f"measured block {sizes[-1]} vs block {sizes[0]}: time {last[0] / first[0]:.2f}x, peak memory "
          f"{(last[1] - first[1]) / 2**20:+.1f} MiB; recompute grows with the video")


def fps_report(args, causal, context, latent_size, device):
    """Self-Forcing's setting: 21 latent frames, unbounded cache, streamed decoding."""
    causal = CausalWanModel(causal.model, num_frame_per_block=3)
    pipe = CausalPipeline.few_step(causal, args.steps)
    with device:
        vae = WanVAE21().to(torch.bfloat16).eval()
    frames = 4 * 21 - 3
    for decode in (False, True):
        for warm in (True, False):  # the first run pays for kernel selection
            torch.cuda.synchronize()
            start = time.perf_counter()
            decoder = StreamingDecoder(vae)
            for i, latents in enumerate(pipe.generate(context, 21, latent_size,
                                                      generator=torch.Generator(device).manual_seed(0))):
                if decode:
                    with torch.no_grad():
                        decoder.decode(latents)
                if i == 0:
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
            torch.cuda.synchronize()
            total = time.perf_counter() - start
        what = "DiT + streaming VAE decode" if decode else "DiT only"
        print(f"1.3B 832x480, 21 latent frames ({frames} frames), {what}: {frames / total:.1f} FPS, "
              f"{total:.2f} s total, first block after {first:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, nargs="+", default=(4, 16, 64))
    parser.add_argument("--window", type=int, default=None,
                        help="local_attn_size in latent frames (default: 12 on CPU, 21 on CUDA)")
    parser.add_argument("--steps", type=int, nargs="+", default=(1000, 750, 500, 250), help="denoising_step_list")
    parser.add_argument("--latent_size", type=int, nargs=2, default=(8, 8), help="CPU model's latent h w")
    parser.add_argument("--max_mask_gib", type=float, default=4.0, help="largest attention mask the peer may build")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; the small model's ops are too small to gain from more")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.window is None:
        args.window = 21 if device.type == "cuda" else 12
    torch.set_num_threads(args.threads)
    causal, context, latent_size = build(args, device)
    rolling_window_table(args, causal, context, latent_size, device)
    if device.type == "cuda":
        fps_report(args, causal, context, latent_size, device)


if __name__ == "__main__":
    main()
