"""Benchmarks of this codebase against its peers, each measured in the same process on the same weights.

    python scripts/benchmark.py dit vae t2v causal train     # CPU: small configs, fp32, 2 threads
    python scripts/benchmark.py dit --device cuda            # real sizes (random weights), bf16
    python scripts/benchmark.py dit --profile                # + torch.profiler summary of both
    python scripts/benchmark.py vae --vae_size 256 --vae_tile 128   # + ours with spatial tiling
    python scripts/benchmark.py teacache --threads 1 --repeats 3    # TeaCache speed-up and PSNR

Suites and peers:
  dit     DiT forward and forward+backward    vs diffusers `WanTransformer3DModel`
  vae     Wan2.1 / Wan2.2 VAE encode, decode  vs diffusers `AutoencoderKLWan` (+ peak memory)
  t2v     one sampling step of the T2V pipeline (CFG pair + UniPC update) vs diffusers `WanPipeline`'s
          loop body (two transformer calls on the 512-token padded prompt + `UniPCMultistepScheduler`)
  causal  per-block latency and peak memory of KV-cached causal generation vs the eager path that
          recomputes the whole video so far for every block; on CUDA also frames per second
  train   one training step (flow-matching loss, backward, AdamW) vs the same step on diffusers'
          model: step time, tokens/s, peak memory; `--blocks_to_swap N` adds ours with N blocks offloaded
  teacache the sampling loop of `WanVideoPipeline` with TeaCache at `--thresholds` vs the plain sampler
          on a tiny random t2v DiT: steps run, time, speed-up and PSNR of the latents against the plain ones

Timing: after a warm-up call each, ours and the peer run alternately `--repeats` times (so load on a
shared machine hits both alike); the median times are printed, and as ratio the median over rounds of
ours / peer within a round (below 1: ours is faster), of wall time and of this process's CPU time
(less sensitive to other processes taking the cores). CPU peak memory is the rise of the resident set's high-water mark during one call,
measured in a fresh process per measurement (so memory freed by an earlier call cannot serve it), with
glibc told to return every freed block above 64 KiB to the system at once (so the resident set tracks
live tensors and oneDNN's scratch buffers, not the allocator's reuse of earlier frees).
The script checks that both sides compute the same result and prints the largest difference.
On the CPU, ours' DiT runs its fp32 linears through oneDNN in the dit and t2v suites, as `inference.py`
does there (`wan.onednn_linear.use_onednn_linears`); `--plain_linears` measures it with plain
`nn.Linear` (MKL) instead. The training step runs plain linears, as `train.py` does.

`--device cuda` runs 1.3B at 832x480x81, one 14B layer (x40 gives the model), 5B at 1280x704x121.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.causal import CausalPipeline  # noqa: E402
from wan.configs import PRESETS  # noqa: E402
from wan.convert.dit_diffusers import config_to_diffusers, dit_to_diffusers  # noqa: E402
from wan.modules.causal_model import CausalWanModel  # noqa: E402
from wan.modules.model import WanModel  # noqa: E402
from wan.modules.vae2_1 import WanVAE21  # noqa: E402
from wan.modules.vae_streaming import StreamingDecoder  # noqa: E402
from wan.onednn_linear import use_onednn_linears  # noqa: E402

SUITES = ("dit", "vae", "t2v", "causal", "train", "teacache")

# CPU configs: small enough for a 2-core machine, large enough that matmuls and attention dominate.
CPU_DIT = dict(model_type="t2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=4, text_dim=4096, freq_dim=256)
CPU_GRID = (8, 32, 32)  # latent F H W: 2048 tokens
# CUDA configs: name -> (preset, layer count override or None, latent F H W, multiplier to the whole model)
CUDA_DITS = {
    "1.3B 832x480x81": ("t2v-1.3B", None, (21, 60, 104), 1),
    "14B 832x480x81, 1 of 40 layers": ("t2v-14B", 1, (21, 60, 104), 40),
    "5B 1280x704x121": ("ti2v-5B", None, (31, 44, 80), 1),
}
PROMPT_TOKENS = 64
CPU_CAUSAL = dict(model_type="t2v", dim=128, ffn_dim=256, num_heads=4, num_layers=4, text_dim=64, freq_dim=64)


# -- measurement ---------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timing(NamedTuple):
    wall: float  # median seconds
    cpu: float   # median CPU seconds of this process (all threads)
    walls: list
    cpus: list


def interleaved(fns, repeats, device, warmup=1):
    """{name: Timing} of each `fns[name]()`, the functions run alternately `repeats` times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    walls = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {name: Timing(statistics.median(walls[name]), statistics.median(cpus[name]), walls[name], cpus[name])
            for name in fns}


def paired_ratio(times, a="ours", b="peer", field="walls"):
    """Median over repeats of a's time / b's time in the same round (the two ran back to back, so
    they met about the same load)."""
    return statistics.median(x / y for x, y in zip(getattr(times[a], field), getattr(times[b], field)))


def timing_note(times):
    return f"CPU-time ratio {paired_ratio(times, field='cpus'):.3f}"


class PeakMemory:
    """High-water mark of memory since `reset()`, in bytes above the level at the reset
    (CUDA: allocated tensors; CPU: the resident set, Linux)."""

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
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_of(fn, device):
    memory = PeakMemory(device)
    memory.reset()
    fn()
    return memory.peak()


def child_peak(args, suite, key):
    """Peak memory rise (bytes) of operation `key` of `suite`, measured in a fresh process."""
    cmd = [sys.executable, __file__, suite, "--child", key, "--threads", str(args.threads),
           "--device", args.device, "--vae_frames", str(args.vae_frames), "--vae_size", str(args.vae_size),
           "--vae_tile", str(args.vae_tile)]
    # glibc serves allocations above this size with their own mmap and unmaps them when freed, so
    # the resident set follows the live tensors (as CUDA's allocated bytes do) rather than what
    # the heap keeps after earlier frees, which depends on each side's allocation history.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def report(title, rows, header=("ours", "peer")):
    """rows: (label, {"ours": Timing, "peer": Timing} or {"ours": Timing}, extra text). The ratio is
    `paired_ratio` of wall times."""
    print(f"\n{title}")
    print(f"  {'':34}{header[0]:>12}{header[1]:>14}{'ours/peer':>11}")
    for label, times, extra in rows:
        ours, peer = times["ours"], times.get("peer")
        ratio = f"{paired_ratio(times):>10.3f}" if peer else f"{'':>10}"
        peer_text = f"{peer.wall * 1e3:>11.1f} ms" if peer else f"{'-':>14}"
        print(f"  {label:34}{ours.wall * 1e3:>9.1f} ms{peer_text}{ratio}  {extra}")


def profile_summary(fn, title, rows=12):
    """torch.profiler table of one call, and the share of matmul / attention / convolution."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    compute = ("addmm", "mm", "bmm", "matmul", "linear", "scaled_dot_product", "flash_attention",
               "convolution", "conv", "mkldnn", "_efficient_attention")
    core = sum(e.self_cpu_time_total for e in events if any(c in e.key for c in compute))
    print(f"\nprofile: {title}: {100 * core / total:.0f}% of self CPU time in matmul / attention / convolution")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


# -- models --------------------------------------------------------------------------------------

def random_dit(config, device, dtype, std=0.02):
    """WanModel with N(0, std) weights (built on `device`)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.to(dtype)


def onednn_linears(model, args):
    """Ours' CPU fast path for fp32 linears (`wan.onednn_linear`), unless `--plain_linears`."""
    if torch.device(args.device).type == "cpu" and not args.plain_linears:
        use_onednn_linears(model)
    return model


def diffusers_twin(ours, config, device, dtype):
    """diffusers' WanTransformer3DModel holding `ours`' weights."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        theirs = WanTransformer3DModel(**config_to_diffusers(config))
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    return theirs.to(device, dtype)


def dit_configs(args):
    """[(label, config, latent grid, scale)]: the small CPU model, or the real ones on CUDA."""
    if args.device == "cpu":
        return [(f"dim {CPU_DIT['dim']}, {CPU_DIT['num_layers']} layers, "
                 f"{math.prod(CPU_GRID) // 4} tokens", CPU_DIT, CPU_GRID, 1)]
    out = []
    for label, (preset, layers, grid, scale) in CUDA_DITS.items():
        config = dict(PRESETS[preset].dit)
        if layers:
            config["num_layers"] = layers
        out.append((label, config, grid, scale))
    return out


def dit_inputs(config, grid, device, dtype, batch=1):
    """Latents, timestep and a prompt of PROMPT_TOKENS real tokens (ours: unpadded; diffusers: padded
    with zeros to text_len 512, as the official encoder output is)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.get("in_dim", 16), *grid, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    prompt = torch.randn(batch, PROMPT_TOKENS, config["text_dim"], generator=g).to(device, dtype)
    padded = torch.zeros(batch, config.get("text_len", 512), config["text_dim"], device=device, dtype=dtype)
    padded[:, :PROMPT_TOKENS] = prompt
    return x, t, prompt, padded


# -- suites --------------------------------------------------------------------------------------

def suite_dit(args):
    device, dtype = torch.device(args.device), args.dtype
    for label, config, grid, scale in dit_configs(args):
        ours = onednn_linears(random_dit(config, device, dtype).eval(), args)
        theirs = diffusers_twin(ours, config, device, dtype).eval()
        if args.checkpointing:
            ours.set_gradient_checkpointing(True)
            theirs.enable_gradient_checkpointing()
        x, t, prompt, padded = dit_inputs(config, grid, device, dtype)
        autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)

        def forward(model, grad):
            with torch.set_grad_enabled(grad), autocast:
                if model is ours:
                    return ours(x, t, prompt)
                return theirs(x, t, padded, return_dict=False)[0]

        def train_step(model):
            model.zero_grad(set_to_none=True)
            forward(model, True).float().square().mean().backward()

        with torch.no_grad():
            diff = max_diff(forward(ours, False), forward(theirs, False))
        fwd = interleaved({"ours": lambda: forward(ours, False), "peer": lambda: forward(theirs, False)},
                          args.repeats, device)
        bwd = interleaved({"ours": lambda: train_step(ours), "peer": lambda: train_step(theirs)},
                          args.repeats, device)
        rows = []
        for what, times in (("forward", fwd), ("forward+backward", bwd)):
            extra = timing_note(times) if device.type == "cpu" else \
                f"x{scale} model: {times['ours'].wall * scale:.2f} s vs {times['peer'].wall * scale:.2f} s"
            rows.append((what, times, extra))
        report(f"DiT {label}, {args.dtype_name}, {args.device}, {args.threads} threads, median of {args.repeats}; "
               f"peer diffusers WanTransformer3DModel (max |diff| {diff:.1e})", rows, ("ours", "diffusers"))
        if args.profile:
            with torch.no_grad():
                profile_summary(lambda: forward(ours, False), "ours DiT forward")
                profile_summary(lambda: forward(theirs, False), "diffusers DiT forward")
        if args.fp8:  # last: quantizes ours in place
            fp8_forward(args, ours, lambda: forward(ours, False), device)


def fp8_forward(args, model, forward, device):
    """Ours again with fp8 linear weights (`wan.fp8.quantize_fp8`): forward time, weight bytes, error."""
    from wan.fp8 import fp8_bytes, quantize_fp8

    with torch.no_grad():
        reference = forward().float()
        before = fp8_bytes(model)
        quantize_fp8(model)
        out = forward().float()
        wall = interleaved({"fp8": forward}, args.repeats, device)["fp8"].wall
    error = ((out - reference).norm() / reference.norm()).item()
    print(f"  {'forward, fp8 weights (ours)':34}{wall * 1e3:>9.1f} ms  weights {before / 2**20:.0f} -> "
          f"{fp8_bytes(model) / 2**20:.0f} MiB, relative error {error:.1e}")


def vae_models(version, device):
    """(ours, diffusers') VAEs with the same seeded random weights."""
    from diffusers import AutoencoderKLWan

    from wan.convert_vae import VAE_CLASSES, diffusers_config, vae_to_diffusers

    torch.manual_seed(0)
    ours = VAE_CLASSES[version]().eval()
    theirs = AutoencoderKLWan(**diffusers_config(version)).eval()
    theirs.load_state_dict(vae_to_diffusers(ours.state_dict()))
    return ours.to(device), theirs.to(device)


def vae_operations(version, args):
    """{(impl, op): zero-argument call} on a video in [-1, 1] and normalized latents of its shape;
    diffusers works on unnormalized latents, so its calls convert."""
    device = torch.device(args.device)
    ours, theirs = vae_models(version, device)
    g = torch.Generator().manual_seed(1)
    video = (torch.rand(1, 3, args.vae_frames, args.vae_size, args.vae_size, generator=g) * 2 - 1).to(device)
    s, ts = ours.spatial_stride, ours.temporal_stride
    latents = torch.randn(1, ours.z_dim, (args.vae_frames - 1) // ts + 1, args.vae_size // s, args.vae_size // s,
                          generator=g).to(device)
    mean, std = ours.latents_mean.view(1, -1, 1, 1, 1), ours.latents_std.view(1, -1, 1, 1, 1)
    tiling = dict(tiled=True, tile_size=args.vae_tile, tile_overlap=args.vae_tile // 4 // s * s)
    return {("ours", "encode"): lambda: ours.encode(video),
            ("peer", "encode"): lambda: (theirs.encode(video).latent_dist.mode() - mean) / std,
            ("ours", "decode"): lambda: ours.decode(latents),
            ("peer", "decode"): lambda: theirs.decode(latents * std + mean).sample,
            ("ours", "encode tiled"): lambda: ours.encode(video, **tiling),
            ("ours", "decode tiled"): lambda: ours.decode(latents, **tiling)}


def suite_vae(args):
    device = torch.device(args.device)
    for version in ("2.1", "2.2"):
        ops = vae_operations(version, args)
        rows = []
        with torch.no_grad():
            for op in ("encode", "decode"):
                diff = max_diff(ops["ours", op](), ops["peer", op]())
                times = interleaved({impl: ops[impl, op] for impl in ("ours", "peer")}, args.repeats, device)
                if device.type == "cpu":
                    memory = {impl: child_peak(args, "vae", f"{version}:{impl}:{op}") for impl in ("ours", "peer")}
                else:
                    memory = {impl: peak_of(ops[impl, op], device) for impl in ("ours", "peer")}
                rows.append((op, times, f"{timing_note(times)}; peak "
                             f"{memory['ours'] / 2**20:.0f} vs {memory['peer'] / 2**20:.0f} MiB "
                             f"(ratio {memory['ours'] / memory['peer']:.2f}); max |diff| {diff:.1e}"))
            for op in ("encode tiled", "decode tiled") if args.vae_tile else ():
                # differs from the whole-frame result at the seams, hence the mean rather than the max
                diff = (ops["ours", op]() - ops["ours", op.split()[0]]()).abs().mean().item()
                times = interleaved({"ours": ops["ours", op]}, args.repeats, device)
                memory = child_peak(args, "vae", f"{version}:ours:{op}") if device.type == "cpu" else \
                    peak_of(ops["ours", op], device)
                rows.append((op, times, f"{args.vae_tile}px tiles, peak {memory / 2**20:.0f} MiB, "
                                             f"mean |diff| to whole frames {diff:.1e}"))
        if args.profile:
            with torch.no_grad():
                profile_summary(ops["ours", "decode"], f"ours Wan{version} VAE decode")
                profile_summary(ops["peer", "decode"], f"diffusers Wan{version} VAE decode")
        report(f"Wan{version} VAE, video 1x3x{args.vae_frames}x{args.vae_size}x{args.vae_size}, fp32, {args.device}, "
               f"{args.threads} threads, median of {args.repeats}; peer diffusers AutoencoderKLWan",
               rows, ("ours", "diffusers"))
        del ops


def vae_child(args, key):
    version, impl, op = key.split(":")
    ops = vae_operations(version, args)
    fn = ops[impl, op]
    with torch.no_grad():
        return peak_of(fn, torch.device(args.device))


def suite_t2v(args):
    """One denoising step as each pipeline runs it: the conditional and unconditional predictions,
    classifier-free guidance and the UniPC update."""
    from diffusers import UniPCMultistepScheduler

    from wan.samplers import get_sampler

    device, dtype = torch.device(args.device), args.dtype
    label, config, grid, _ = dit_configs(args)[0]
    ours = onednn_linears(random_dit(config, device, dtype).eval(), args)
    theirs = diffusers_twin(ours, config, device, dtype).eval()
    latent, _, prompt, padded = dit_inputs(config, grid, device, torch.float32)
    negative = torch.randn(1, 24, config["text_dim"], generator=torch.Generator().manual_seed(2)).to(device)
    negative_padded = torch.zeros_like(padded)
    negative_padded[:, :24] = negative
    guide, steps, shift = 5.0, 50, 5.0
    sampler = get_sampler("unipc", num_steps=steps, shift=shift)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
    scheduler.set_timesteps(steps, device=device)
    autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)

    @torch.no_grad()
    def ours_step():
        sampler.reset()
        t = sampler.timesteps[0]
        with autocast:
            cond, uncond = ours(latent.expand(2, -1, -1, -1, -1).to(dtype), t.reshape(1).expand(2).to(device),
                                [prompt[0].to(dtype), negative[0].to(dtype)])
        return sampler.step(uncond + guide * (cond - uncond), 0, latent[0])

    @torch.no_grad()
    def peer_step():
        scheduler._step_index, scheduler.model_outputs = None, [None] * scheduler.config.solver_order
        scheduler.lower_order_nums, scheduler.last_sample = 0, None
        t = scheduler.timesteps[0]
        with autocast:
            cond = theirs(latent.to(dtype), t.expand(1), padded.to(dtype), return_dict=False)[0]
            uncond = theirs(latent.to(dtype), t.expand(1), negative_padded.to(dtype), return_dict=False)[0]
        noise_pred = uncond.float() + guide * (cond.float() - uncond.float())
        return scheduler.step(noise_pred, t, latent, return_dict=False)[0][0]

    diff = max_diff(ours_step(), peer_step())
    times = interleaved({"ours": ours_step, "peer": peer_step}, args.repeats, device)
    report(f"T2V sampling step (CFG pair + UniPC), DiT {label}, {args.dtype_name}, {args.device}, {args.threads} "
           f"threads, median of {args.repeats}; peer diffusers WanPipeline loop body (max |diff| {diff:.1e})",
           [("one step", times, timing_note(times))], ("ours", "diffusers"))


class TrainStep:
    """One optimizer step of a model on the flow-matching loss (batch 1, fixed noise and timestep)."""

    def __init__(self, model, config, grid, args, padded_text=False):
        device = torch.device(args.device)
        x0, self.t, prompt, padded = dit_inputs(config, grid, device, torch.float32)
        self.context = padded if padded_text else prompt
        noise = torch.randn_like(x0)
        sigma = self.t[:, None, None, None, None] / 1000
        self.xt, self.target = (1 - sigma) * x0 + sigma * noise, noise - x0
        self.model, self.padded_text = model, padded_text
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.autocast = torch.autocast(device.type, args.dtype, enabled=args.dtype != torch.float32)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            if self.padded_text:  # diffusers
                pred = self.model(self.xt, self.t, self.context, return_dict=False)[0]
            else:
                pred = self.model(self.xt, self.t, self.context)
        loss = (pred.float() - self.target).square().mean()
        loss.backward()
        self.optimizer.step()
        return loss


def suite_train(args):
    """Full fine-tuning step, ours vs diffusers' model; with `--blocks_to_swap`, LoRA steps without and
    with block swap."""
    device = torch.device(args.device)
    label, config, grid, _ = dit_configs(args)[0]
    ours = random_dit(config, device, torch.float32).train()
    theirs = diffusers_twin(ours, config, device, torch.float32).train()
    if args.checkpointing:
        ours.set_gradient_checkpointing(True)
        theirs.enable_gradient_checkpointing()
    steps = {"ours": TrainStep(ours, config, grid, args), "peer": TrainStep(theirs, config, grid, args, True)}
    tokens = math.prod(grid) // 4
    times = interleaved(steps, args.repeats, device)
    if device.type == "cpu":  # fresh processes (the second step of each: after the optimizer state exists)
        memory = {name: child_peak(args, "train", name) for name in steps}
    else:
        memory = {name: peak_of(step, device) for name, step in steps.items()}
    print(f"\ntraining step (loss, backward, AdamW), DiT {label}, compute {args.dtype_name}, {args.device}, "
          f"{args.threads} threads, median of {args.repeats}; peer diffusers WanTransformer3DModel")
    for name, timing in times.items():
        print(f"  {'ours' if name == 'ours' else 'diffusers':10}{timing.wall * 1e3:>10.1f} ms  "
              f"{tokens / timing.wall:>8.0f} tokens/s  peak memory rise {memory[name] / 2**20:>7.0f} MiB")
    print(f"  ratio ours/diffusers: time {paired_ratio(times):.3f} ({timing_note(times)}), "
          f"peak memory {memory['ours'] / max(memory['peer'], 1):.2f}")
    del steps, ours, theirs
    if args.blocks_to_swap:
        lora_block_swap(args, config, grid, tokens)


def train_child(args, impl):
    label, config, grid, _ = dit_configs(args)[0]
    device = torch.device(args.device)
    model = random_dit(config, device, torch.float32).train()
    if impl == "peer":
        model = diffusers_twin(model, config, device, torch.float32).train()
    step = TrainStep(model, config, grid, args, padded_text=impl == "peer")
    step()  # allocates the optimizer state and warms up; the second step is measured
    return peak_of(step, device)


def lora_block_swap(args, config, grid, tokens):
    """LoRA training (rank 32 on every attention and FFN linear, activation checkpointing) without and
    with `--blocks_to_swap` blocks kept on the CPU: step time and peak memory."""
    from wan.lora import inject_lora
    from wan.offload import apply_block_swap

    device = torch.device(args.device)
    print(f"\nLoRA training step, rank 32, activation checkpointing, {args.device}: block swap")
    for swap in (0, args.blocks_to_swap):
        model = random_dit(config, device, args.dtype).train()
        inject_lora(model, ["blocks.*.self_attn.*", "blocks.*.cross_attn.*", "blocks.*.ffn.*"], rank=32)
        model.set_gradient_checkpointing(True)
        if swap:
            apply_block_swap(model, swap, device)
        step = TrainStep(model, config, grid, args)
        wall = interleaved({"lora": step}, args.repeats, device)["lora"].wall
        peak = peak_of(step, device)
        print(f"  blocks_to_swap {swap:>3}: {wall * 1e3:>9.1f} ms  {tokens / wall:>8.0f} tokens/s  "
              f"peak memory rise {peak / 2**20:>7.0f} MiB")
        del model, step


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


def causal_build(args, device):
    """(causal model, context, latent size)."""
    torch.manual_seed(0)
    if device.type == "cuda":
        with device:
            model = WanModel(**PRESETS["t2v-1.3B"].dit).to(torch.bfloat16).eval()
        context = torch.randn(1, 64, 4096, device=device)
        latent_size = (480 // 8, 832 // 8)
    else:
        model = WanModel(**CPU_CAUSAL).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        context = torch.randn(1, 16, CPU_CAUSAL["text_dim"])
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


def suite_causal(args):
    """Per-block latency / peak memory of the KV-cached path vs recomputing (and FPS on CUDA)."""
    device = torch.device(args.device)
    if args.window is None:
        args.window = 21 if device.type == "cuda" else 12
    if device.type == "cpu":
        torch.set_num_threads(args.causal_threads)  # the small model's ops are too small to gain from more
    causal, context, latent_size = causal_build(args, device)
    rolling_window_table(args, causal, context, latent_size, device)
    if device.type == "cuda":
        fps_report(args, causal, context, latent_size, device)
    torch.set_num_threads(args.threads)


def psnr(actual, reference):
    """dB, the peak being the reference's max |value|."""
    mse = (actual.float() - reference.float()).pow(2).mean()
    return float("inf") if mse == 0 else (10 * torch.log10(reference.abs().max() ** 2 / mse)).item()


def teacache_components(args, device):
    """A tiny t2v checkpoint's components with a random DiT of `--teacache_dim` / `--teacache_layers`;
    its time projection bias is shifted (as in the golden trace) so the timestep embedding changes
    between steps in the range the rescaling polynomial was fitted on. The decoder is skipped, so the
    times are the sampling loop's (text encoding included)."""
    import tempfile

    from pipelines.loading import load_components
    from pipelines.tiny_checkpoint import make_tiny_checkpoint

    dim = args.teacache_dim
    with tempfile.TemporaryDirectory() as tmp:
        components = load_components(make_tiny_checkpoint("t2v", Path(tmp) / "t2v"), "t2v", device=device)
    torch.manual_seed(0)
    dit = WanModel(model_type="t2v", dim=dim, ffn_dim=2 * dim, num_heads=max(dim // 64, 1),
                   num_layers=args.teacache_layers, freq_dim=32,
                   text_dim=components.dit.text_embedding[0].in_features, text_len=32).eval()
    with torch.no_grad():
        dit.time_projection[1].bias += 5 * torch.randn(dit.time_projection[1].bias.shape)
    components.dit = dit.requires_grad_(False).to(device)
    components.vae.decode = lambda latent, tiled=False: latent
    return components


def suite_teacache(args):
    """TeaCache at each `--thresholds` vs the plain sampler: same weights, prompt and seed."""
    from pipelines.wan_video import SampleSettings, WanVideoPipeline
    from wan.teacache import COEFFICIENTS, TeaCache

    device, steps = torch.device(args.device), args.teacache_steps
    components = teacache_components(args, device)
    settings = SampleSettings(size="64*64", frame_num=9, sample_steps=steps, seed=0)
    caches = {f"{th:g}": TeaCache(COEFFICIENTS[args.teacache_coefficients], num_steps=steps, threshold=th,
                                  skip_start_steps=args.teacache_skip_start_steps) for th in args.thresholds}
    outputs = {}

    def generate(name):
        pipeline = WanVideoPipeline(components, device, teacache=caches.get(name))

        def run():
            outputs[name] = pipeline.generate("a lighthouse in a storm", settings=settings, progress=False)
        return run

    times = interleaved({name: generate(name) for name in ["plain", *caches]}, args.repeats, device)
    print(f"\nTeaCache on a tiny t2v DiT (dim {args.teacache_dim}, {args.teacache_layers} layers, 64x64x9, {steps} "
          f"steps, {args.teacache_coefficients} coefficients, first {args.teacache_skip_start_steps} steps always "
          f"run), {args.device}, {args.threads} threads, median of {args.repeats}")
    print("| threshold | steps run | sampling s | speed-up | PSNR vs plain (dB) |")
    print("|---|---|---|---|---|")
    for name, timing in times.items():
        run = steps if name == "plain" else sum(r["computed"] for r in caches[name].trace[-steps:])
        print(f"| {name} | {run}/{steps} | {timing.wall:.2f} | {paired_ratio(times, 'plain', name):.2f}x | "
              f"{psnr(outputs[name], outputs['plain']):.1f} |")


def add_teacache_arguments(parser):
    group = parser.add_argument_group("teacache suite")
    group.add_argument("--thresholds", type=float, nargs="+", default=(0.05, 0.1, 0.2))
    group.add_argument("--teacache_dim", type=int, default=256)
    group.add_argument("--teacache_layers", type=int, default=4)
    group.add_argument("--teacache_steps", type=int, default=20)
    group.add_argument("--teacache_skip_start_steps", type=int, default=2)
    group.add_argument("--teacache_coefficients", default="wan2.1-i2v-14b-720p")


def add_causal_arguments(parser):
    group = parser.add_argument_group("causal suite")
    group.add_argument("--blocks", type=int, nargs="+", default=(4, 16, 64))
    group.add_argument("--window", type=int, default=None,
                       help="local_attn_size in latent frames (default: 12 on CPU, 21 on CUDA)")
    group.add_argument("--steps", type=int, nargs="+", default=(1000, 750, 500, 250), help="denoising_step_list")
    group.add_argument("--latent_size", type=int, nargs=2, default=(8, 8), help="CPU model's latent h w")
    group.add_argument("--max_mask_gib", type=float, default=4.0, help="largest attention mask the peer may build")
    group.add_argument("--causal_threads", type=int, default=1, help="CPU threads of the causal suite")


SUITE_FUNCTIONS = {"dit": suite_dit, "vae": suite_vae, "t2v": suite_t2v, "causal": suite_causal, "train": suite_train,
                   "teacache": suite_teacache}
CHILD_FUNCTIONS = {"vae": vae_child, "train": train_child}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="+", choices=SUITES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler summary (dit, vae)")
    parser.add_argument("--fp8", action="store_true", help="dit: also ours with fp8 linear weights")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing on both sides (default on CUDA)")
    parser.add_argument("--blocks_to_swap", type=int, default=0, help="train: offload this many DiT blocks")
    parser.add_argument("--vae_frames", type=int, default=9)
    parser.add_argument("--vae_size", type=int, default=64, help="VAE video height and width in pixels")
    parser.add_argument("--vae_tile", type=int, default=0, help="vae: also time ours with tiles of this many pixels")
    parser.add_argument("--plain_linears", action="store_true",
                        help="CPU: ours' linears through nn.Linear (MKL), without `use_onednn_linears`")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_causal_arguments(parser)
    add_teacache_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.dtype_name = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.dtype = getattr(torch, args.dtype_name)
    args.checkpointing = args.checkpointing or args.device.startswith("cuda")
    if args.child:
        print(json.dumps({"peak": CHILD_FUNCTIONS[args.suites[0]](args, args.child)}))
        return
    for suite in args.suites:
        SUITE_FUNCTIONS[suite](args)


if __name__ == "__main__":
    main()
