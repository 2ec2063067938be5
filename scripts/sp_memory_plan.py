"""What Ulysses sequence parallelism buys per GPU, computed from a model's dimensions (nothing runs).

    python scripts/sp_memory_plan.py [--preset t2v-14B ...] [--size 1280*720] [--frame_num 81]
                                     [--batch 2] [--dtype bf16] [--degrees 1 2 4 8]

For each preset (default: t2v-14B, ti2v-5B and t2v-1.3B at their first official size and frame
count) and each degree P, one row of one DiT forward (a denoising step; batch 2 = the conditional
and unconditional branch of classifier-free guidance):

- tokens/rank: ceil(L / P), the sequence a rank's blocks run on (padding included);
- weights GB: the DiT's parameters per rank, replicated / with --dit_fsdp (1/P, plus one gathered
  block at a time, not counted);
- activations GB: the peak working set of a block per rank: the fp32 residual stream [B, L/P, C],
  plus the larger of self-attention (the modulated input, q, k, v, their copies in the all-to-all's
  send and receive buffers, the output: 5 or, with P > 1, 11 x [B, L/P, C]) and the FFN (the
  modulated input and 2 x [B, L/P, ffn_dim]), in the compute dtype; for per-token timesteps (TI2V)
  also the time modulation [B, L, 6, C] fp32, computed whole on every rank. Attention scores are
  never stored (flash / fused SDPA);
- a2a MB/layer: bytes a rank sends per layer in its 4 all-to-alls (q, k, v and the output, each
  (P - 1) / P of [B, L/P, C]), as many received; a2a GB/step adds up the layers and the all-gather of
  the head's output;
- TFLOP/rank: forward FLOPs per rank per step (the blocks' linear layers per token, self-attention
  4 B L^2 C / P, cross-attention to text_len tokens);
- FLOP/byte: TFLOP/rank over a2a GB/step. Communication stays hidden while this exceeds the GPU's
  FLOP/s over its all-to-all bandwidth (e.g. H100: ~990 TFLOP/s bf16 over ~450 GB/s NVLink: ~2200).

Compute and activations per rank fall as 1/P (self-attention a little slower: its cost grows with
L^2 / P), communication per rank stays flat; the degree must divide the heads.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan.configs import get_preset  # noqa: E402
from wan.modules.model import WanModel  # noqa: E402

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_PRESETS = ("t2v-14B", "ti2v-5B", "t2v-1.3B")
GB, MB = 1e9, 1e6


def model_shape(preset):
    """A meta-device DiT of the preset: (model, per-token linear weights of one block)."""
    with torch.device("meta"):
        model = WanModel(**preset.dit)
    context_only = ("cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img")
    per_token = sum(m.weight.numel() for name, m in model.blocks[0].named_modules()
                    if isinstance(m, torch.nn.Linear) and name not in context_only)
    return model, per_token


def num_tokens(preset, size, frame_num):
    """(L, token grid) of a video of `size` "W*H" and `frame_num` frames."""
    width, height = (int(v) for v in size.split("*"))
    st, sh, sw = preset.vae_stride
    pt, ph, pw = preset.patch_size
    grid = ((frame_num - 1) // st // pt + 1, height // sh // ph, width // sw // pw)
    return math.prod(grid), grid


def plan_row(model, per_token, preset, length, degree, batch, dtype_bytes):
    """The table's numbers for one degree (see the module docstring)."""
    c, ffn, layers = model.dim, model.blocks[0].ffn[0].out_features, len(model.blocks)
    local = -(-length // degree)
    weights = sum(p.numel() for p in model.parameters()) * dtype_bytes
    unit = batch * local * c * dtype_bytes
    attention = (11 if degree > 1 else 5) * unit
    feed_forward = unit + 2 * batch * local * ffn * dtype_bytes
    activations = batch * local * c * 4 + max(attention, feed_forward)
    if preset.task == "ti2v":
        activations += batch * length * 6 * c * 4
    a2a_layer = 4 * unit * (degree - 1) / degree
    head_out = batch * local * math.prod(preset.patch_size) * model.out_dim * 4 * (degree - 1)
    a2a_step = layers * a2a_layer + head_out
    per_layer = 2 * local * per_token + 4 * length * length * c / degree + 4 * local * preset.text_len * c
    flops = layers * batch * per_layer
    return dict(degree=degree, tokens=local, weights=weights / GB, fsdp=weights / degree / GB,
                activations=activations / GB, a2a_layer=a2a_layer / MB, a2a_step=a2a_step / GB,
                tflop=flops / 1e12, intensity=flops / a2a_step if a2a_step else None)


def print_plan(name, size, frame_num, batch, dtype, degrees):
    preset = get_preset(name)
    size, frame_num = size or preset.sizes[0], frame_num or preset.frame_num
    model, per_token = model_shape(preset)
    length, grid = num_tokens(preset, size, frame_num)
    print(f"\n{name}: {size}, {frame_num} frames -> {' x '.join(map(str, grid))} = {length:,} tokens; batch {batch}, "
          f"{dtype}, {len(model.blocks)} layers, {model.num_heads} heads")
    header = ("degree", "tokens/rank", "weights GB", "FSDP GB", "activations GB", "a2a MB/layer", "a2a GB/step",
              "TFLOP/rank", "FLOP/byte")
    print("  ".join(f"{h:>14}" for h in header))
    for degree in degrees:
        if model.num_heads % degree:
            print(f"{degree:>14}  not possible: {model.num_heads} heads are not divisible by {degree}")
            continue
        r = plan_row(model, per_token, preset, length, degree, batch, DTYPE_BYTES[dtype])
        intensity = "-" if r["intensity"] is None else f"{r['intensity']:,.0f}"
        cells = (r["degree"], f"{r['tokens']:,}", f"{r['weights']:.1f}", f"{r['fsdp']:.1f}",
                 f"{r['activations']:.2f}", f"{r['a2a_layer']:.0f}", f"{r['a2a_step']:.2f}", f"{r['tflop']:.0f}",
                 intensity)
        print("  ".join(f"{v:>14}" for v in cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="repeatable; default: " + ", ".join(DEFAULT_PRESETS))
    parser.add_argument("--size", help="W*H (default: the preset's first size)")
    parser.add_argument("--frame_num", type=int, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=2, help="2: guided (conditional + unconditional)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args(argv)
    for name in args.preset or DEFAULT_PRESETS:
        print_plan(name, args.size, args.frame_num, args.batch, args.dtype, args.degrees)


if __name__ == "__main__":
    main()
