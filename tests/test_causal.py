"""Causal Wan: KV-cache generation against the block-causal forward, rolling window and sink,
unbounded length, streaming decode, pipelines and checkpoint loading (tiny fp32 models)."""

import pytest
import torch
import yaml

from conftest import REPO_ROOT, randomize, tiny_dit_config
from pipelines.causal import CausalPipeline, causal_model_from_config, pipeline_from_config
from wan.modules.attention import attention
from wan.modules.causal_model import CausalWanModel, load_causal_dit
from wan.modules.model import WanModel
from wan.modules.rope import apply_rope, rope_cos_sin
from wan.modules.vae2_1 import WanVAE21

GRID = (4, 6)  # latent h, w: 2 x 3 = 6 tokens per frame after the 2x2 patch


def sharpen(model, gain=2.0):
    """Large q/k norm gains: peaked attention, so which keys are seen and where they sit shows in the
    outputs far above rounding (with small random weights attention is nearly uniform)."""
    with torch.no_grad():
        for block in model.blocks:
            block.self_attn.norm_q.weight.add_(gain)
            block.self_attn.norm_k.weight.add_(gain)
    return model


@pytest.fixture(scope="module")
def wan():
    return sharpen(randomize(WanModel(**tiny_dit_config()))).eval()


def _inputs(num_frames, grid=GRID, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, num_frames, *grid, generator=g), torch.randn(1, 5, 32, generator=g)


def _block_timesteps(causal, num_frames):
    """A different timestep per block: [B, F] per frame, and the per-block scalars."""
    per_block = [100.0 * (i + 1) for i in range(len(causal.block_sizes(num_frames)))]
    per_frame = [t for t, n in zip(per_block, causal.block_sizes(num_frames)) for _ in range(n)]
    return torch.tensor([per_frame]), per_block


def _generate_blocks(causal, x, context, per_block, junk_steps=1, **cache_options):
    """Incremental generation: each block first gets `junk_steps` forwards of other inputs (the
    denoising steps), then the real one, whose output is returned; the last forward is cached."""
    kv, cross = causal.new_kv_cache(**cache_options), causal.cross_cache(context)
    g = torch.Generator().manual_seed(1)
    outputs, start = [], 0
    for n, t in zip(causal.block_sizes(x.shape[2]), per_block):
        block = x[:, :, start:start + n]
        for _ in range(junk_steps):
            causal.forward_block(torch.randn(block.shape, generator=g), torch.tensor([999.0]), start, kv, cross)
        outputs.append(causal.forward_block(block, torch.tensor([t]), start, kv, cross))
        start += n
    return torch.cat(outputs, dim=2), kv


@pytest.mark.parametrize("num_frames, options", [
    (7, dict(num_frame_per_block=2)),
    (7, dict(num_frame_per_block=3, independent_first_frame=True)),
    (9, dict(num_frame_per_block=2, local_attn_size=4)),
    (8, dict(num_frame_per_block=2, local_attn_size=3, independent_first_frame=True)),
    (4, dict(num_frame_per_block=2, local_attn_size=5, sink_size=1)),  # the window never slides
])
def test_causal_kv_cache_matches_block_causal_forward(wan, num_frames, options):
    causal = CausalWanModel(wan, **options)
    x, context = _inputs(num_frames)
    per_frame, per_block = _block_timesteps(causal, num_frames)
    with torch.no_grad():
        expected = causal(x, per_frame, context)
        incremental, _ = _generate_blocks(causal, x, context, per_block)
    torch.testing.assert_close(incremental, expected, atol=1e-5, rtol=1e-5)


def test_causal_rolling_window_forgets_old_frames(wan):
    x, context = _inputs(8)
    with torch.no_grad():
        unbounded = CausalWanModel(wan, num_frame_per_block=2)(x, torch.tensor([500.0]), context)
        window = CausalWanModel(wan, num_frame_per_block=2, local_attn_size=4)(x, torch.tensor([500.0]), context)
    # Blocks 0 and 1 see everything before them either way; later blocks lose the oldest frames.
    torch.testing.assert_close(window[:, :, :4], unbounded[:, :, :4])
    assert (window[:, :, 4:] - unbounded[:, :, 4:]).abs().max() > 1e-2


class WindowSinkReference:
    """Self-attention of a whole clip with the explicit window + sink mask, the sink keys moved to
    just before the oldest frame each query block keeps (window-relative positions): what the
    rolling cache is meant to compute, without its bookkeeping."""

    def __init__(self, causal, num_frames, tokens_per_frame):
        self.mask = causal.attention_mask(num_frames, tokens_per_frame)
        self.tokens_per_frame = tokens_per_frame
        self.sink, self.window = causal.sink_size, causal.local_attn_size
        sizes = causal.block_sizes(num_frames)
        self.blocks = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]

    def attend(self, q, k, v):
        tpf, sink_tokens = self.tokens_per_frame, self.sink * self.tokens_per_frame
        out = []
        for start, end in self.blocks:
            shift = max(0, end - self.window)
            cos, sin = rope_cos_sin(torch.tensor([[shift, 0, 0]]), k.shape[-1])
            sink = apply_rope(k[:, :sink_tokens], cos.expand(sink_tokens, -1, -1), sin.expand(sink_tokens, -1, -1))
            keys = torch.cat([sink, k[:, sink_tokens:]], dim=1)
            rows = slice(start * tpf, end * tpf)
            out.append(attention(q[:, rows], keys, v, attn_mask=self.mask[rows]))
        return torch.cat(out, dim=1)


@pytest.mark.parametrize("options", [
    dict(num_frame_per_block=2, local_attn_size=5, sink_size=1),
    dict(num_frame_per_block=1, local_attn_size=4, sink_size=2, independent_first_frame=True),
])
def test_causal_rolling_cache_with_sink_matches_explicit_window_sink_mask(wan, options):
    causal = CausalWanModel(wan, **options)
    num_frames = 11
    x, context = _inputs(num_frames)
    per_frame, per_block = _block_timesteps(causal, num_frames)
    with torch.no_grad():
        tokens, grid = wan.embed_tokens(x)
        e, e0 = causal.embed_time(per_frame, grid)
        reference = WindowSinkReference(causal, grid[0], grid[1] * grid[2])
        rope, embedded = wan.rope(grid, x.device), wan.embed_context(context)
        for block in wan.blocks:
            tokens = block(tokens, e0, rope, embedded, kv_cache=reference)
        expected = wan.project_out(tokens, e, grid)
        incremental, kv = _generate_blocks(causal, x, context, per_block)
    torch.testing.assert_close(incremental, expected, atol=1e-5, rtol=1e-5)
    # The same mask with the sink left at its absolute positions is another model once the window slides.
    assert (causal(x, per_frame, context) - expected).abs().max() > 1e-2
    assert kv.layers[0].k.shape[1] == causal.local_attn_size


def test_causal_single_block_equals_bidirectional_model(wan):
    x, context = _inputs(5)
    t = torch.tensor([321.0])
    causal = CausalWanModel(wan, num_frame_per_block=5)
    with torch.no_grad():
        expected = wan(x, t, context)
        full = causal(x, t, context)
        block = causal.forward_block(x, t, 0, causal.new_kv_cache(), causal.cross_cache(context))
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block, expected, atol=1e-5, rtol=1e-5)


def _one_token_model():
    """1 token per frame (a 2x2 latent grid), tiny dims: a thousand frames in a few seconds."""
    config = tiny_dit_config(dim=32, ffn_dim=64, num_heads=2)
    return sharpen(randomize(WanModel(**config))).eval()


def test_causal_generates_past_1024_frames_without_wrapping():
    # Positions beyond the reference's 1024-row RoPE table: with a window, an output depends only on
    # the last few frames and their distances, so the last frames must come out exactly as the same
    # inputs do at the start of a fresh video. A table lookup that wrapped at 1024 would break that.
    causal = CausalWanModel(_one_token_model(), num_frame_per_block=8, local_attn_size=16)
    frames, suffix = 1032, 48
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, frames, 2, 2, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.rand(frames // 8, generator=g) * 1000

    def run(first):
        kv, cross = causal.new_kv_cache(), causal.cross_cache(context)
        outs = [causal.forward_block(x[:, :, i:i + 8], t[i // 8:i // 8 + 1], i - first, kv, cross)
                for i in range(first, frames, 8)]
        return torch.cat(outs, dim=2), kv

    with torch.no_grad():
        long, kv = run(0)
        assert causal._block_rope[0][1] == frames - 8  # the last block really sat at frame 1024
        fresh, _ = run(frames - suffix)
    assert torch.isfinite(long).all()
    # Two layers over a 16-frame window: the last 16 outputs depend on frames 1000 on only.
    torch.testing.assert_close(long[:, :, -16:], fresh[:, :, -16:], atol=1e-5, rtol=1e-5)
    assert kv.layers[0].k.shape[1] == 16  # memory stayed at the window


def test_causal_unbounded_window_pipeline_runs_past_1024_frames():
    causal = CausalWanModel(_one_token_model(), num_frame_per_block=16, local_attn_size=-1)
    pipe = CausalPipeline.few_step(causal, [1000])
    context = torch.randn(1, 5, 32)
    blocks = list(pipe.generate(context, 1030, (2, 2), generator=torch.Generator().manual_seed(0)))
    assert [b.shape[2] for b in blocks] == [16] * 64 + [6]
    assert all(torch.isfinite(b).all() for b in blocks)


def _tiny_vae():
    return WanVAE21(dim=4, dim_mult=(1, 1), num_res_blocks=0, temperal_downsample=(True,)).eval()


def test_causal_streamed_decode_equals_full_decode(wan):
    causal = CausalWanModel(wan, num_frame_per_block=2)
    pipe = CausalPipeline.few_step(causal, [1000, 500])
    vae, context = _tiny_vae(), torch.randn(1, 5, 32)
    streamed = list(pipe.stream_video(vae, context, 5, GRID, generator=torch.Generator().manual_seed(3)))
    latents = list(pipe.generate(context, 5, GRID, generator=torch.Generator().manual_seed(3)))
    assert [b.shape[2] for b in latents] == [2, 2, 1]
    assert [f.shape[2] for f in streamed] == [1 + 2, 2 * 2, 2]  # temporal stride 2 here
    with torch.no_grad():
        full = vae.decode(torch.cat(latents, dim=2))
    torch.testing.assert_close(torch.cat(streamed, dim=2), full, atol=1e-5, rtol=1e-5)


def test_causal_few_step_pipeline_writes_clean_blocks_to_cache(wan):
    # Later blocks see the yielded (clean) blocks, not the noisy steps: block 2 regenerated by hand
    # over a cache written from the yielded blocks 0 and 1 at timestep 0 comes out the same.
    causal = CausalWanModel(wan, num_frame_per_block=2)
    pipe = CausalPipeline.few_step(causal, [1000, 750, 500, 250])
    context, noise = torch.randn(1, 5, 32), torch.randn(1, 16, 6, *GRID)
    blocks = list(pipe.generate(context, 6, GRID, noise=noise, generator=torch.Generator().manual_seed(0)))
    kv, cross = causal.new_kv_cache(), causal.cross_cache(context)
    generator, x = torch.Generator().manual_seed(0), noise[:, :, 4:]
    for _ in range(6):  # blocks 0 and 1 re-noised 3 times each
        torch.randn(x.shape, generator=generator)
    with torch.no_grad():
        for start in (0, 2):
            causal.forward_block(blocks[start // 2], torch.zeros(1), start, kv, cross)
        for i, t in enumerate(pipe.sampler.timesteps):
            x = pipe.sampler.step(causal.forward_block(x, t.reshape(1), 4, kv, cross), i, x, generator)
    torch.testing.assert_close(blocks[2], x, atol=1e-5, rtol=1e-5)


def test_causal_image_to_video_prefix(wan):
    causal = CausalWanModel(wan, num_frame_per_block=2, independent_first_frame=True)
    pipe = CausalPipeline.few_step(causal, [1000, 500])
    context = torch.randn(1, 5, 32)

    def run(image):
        return list(pipe.generate(context, 5, GRID, prefix=image, generator=torch.Generator().manual_seed(0)))

    image_a, image_b = torch.randn(1, 16, 1, *GRID), torch.randn(1, 16, 1, *GRID)
    a, b = run(image_a), run(image_b)
    assert [blk.shape[2] for blk in a] == [1, 2, 2]
    assert torch.equal(a[0], image_a)
    assert (a[1] - b[1]).abs().max() > 1e-4  # later blocks are conditioned on the image
    with pytest.raises(ValueError, match="block boundary"):
        run(torch.randn(1, 16, 2, *GRID))


def test_causal_cfg_branches_have_separate_caches(wan):
    # guide_scale 0 keeps only the unconditional prediction: that equals unguided generation from the
    # negative prompt only if the unconditional branch attends to its own history.
    causal = CausalWanModel(wan, num_frame_per_block=2)
    positive, negative = torch.randn(1, 5, 32), torch.randn(1, 7, 32)
    guided = CausalPipeline.multi_step(causal, "euler", num_steps=3, guide_scale=0.0)
    plain = CausalPipeline.multi_step(causal, "euler", num_steps=3, guide_scale=1.0)
    seed = torch.Generator().manual_seed(0)
    out = list(guided.generate(positive, 6, GRID, negative_context=negative, generator=seed))
    ref = list(plain.generate(negative, 6, GRID, generator=torch.Generator().manual_seed(0)))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="negative_context"):
        next(guided.generate(positive, 6, GRID))


def test_causal_model_loads_self_forcing_checkpoint(wan, tmp_path):
    config = tiny_dit_config()
    state = wan.state_dict()
    torch.save({"generator": {f"model.{k}": torch.zeros_like(v) for k, v in state.items()},
                "generator_ema": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "self_forcing_dmd.pt")
    causal = load_causal_dit(tmp_path / "self_forcing_dmd.pt", config, nested_key="generator_ema",
                             num_frame_per_block=3)
    assert all(torch.equal(a, b) for a, b in zip(causal.model.state_dict().values(), state.values()))
    # Its own state dict is the Self-Forcing layout: the generator entry loads as is.
    fresh = CausalWanModel(WanModel(**config))
    fresh.load_state_dict(torch.load(tmp_path / "self_forcing_dmd.pt")["generator_ema"], strict=True)
    x, context = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, torch.tensor([500.0]), context), wan(x, torch.tensor([500.0]), context))


def test_causal_cache_rejects_out_of_order_blocks(wan):
    causal = CausalWanModel(wan, num_frame_per_block=2, local_attn_size=4, sink_size=1)
    x, context = _inputs(2)
    kv, cross = causal.new_kv_cache(), causal.cross_cache(context)
    with torch.no_grad():
        causal.forward_block(x, torch.zeros(1), 0, kv, cross)
        with pytest.raises(ValueError, match="expected a block at frame 2"):
            causal.forward_block(x, torch.zeros(1), 4, kv, cross)
    with pytest.raises(ValueError, match="must hold sink_size"):
        CausalWanModel(wan, num_frame_per_block=3, local_attn_size=3, sink_size=1)


def test_causal_self_forcing_config_gives_the_few_step_pipeline(wan):
    config = yaml.safe_load((REPO_ROOT / "configs" / "self_forcing_dmd.yaml").read_text())
    causal = causal_model_from_config(wan, config)
    pipe = pipeline_from_config(causal, config)
    assert (causal.num_frame_per_block, causal.local_attn_size, causal.sink_size) == (3, -1, 0)
    assert causal.block_sizes(config["num_output_frames"]) == [3] * 7
    assert pipe.guide_scale == 1 and pipe.context_noise == 0
    torch.testing.assert_close(pipe.sampler.timesteps, torch.tensor([1000, 937.5, 2500 / 3, 625]))


@pytest.mark.parametrize("options", [
    dict(num_frame_per_block=2),  # unbounded: allocated for the whole video
    dict(num_frame_per_block=2, local_attn_size=4),  # rolling past the window
    dict(num_frame_per_block=1, local_attn_size=4, sink_size=2, independent_first_frame=True),
])
def test_causal_static_shape_cache_equals_the_plain_cache(wan, options):
    causal = CausalWanModel(wan, **options)
    num_frames = 7
    x, context = _inputs(num_frames)
    _, per_block = _block_timesteps(causal, num_frames)
    with torch.no_grad():
        plain, _ = _generate_blocks(causal, x, context, per_block)
        static, kv = _generate_blocks(causal, x, context, per_block, num_frames=num_frames, static_shapes=True)
    torch.testing.assert_close(static, plain, atol=1e-5, rtol=1e-5)
    capacity = num_frames if causal.local_attn_size == -1 else causal.local_attn_size
    assert kv.layers[0].k.shape[1] == capacity and kv.slot_in_use.shape == (capacity,)
    assert kv.slot_in_use.all()


def test_causal_static_shape_cache_steps_keep_their_shapes_and_tensors(wan):
    causal = CausalWanModel(wan, num_frame_per_block=2, local_attn_size=4)
    kv, cross = causal.new_kv_cache(static_shapes=True), causal.cross_cache(torch.randn(1, 5, 32))
    seen = set()
    with torch.no_grad():
        for start in range(0, 8, 2):
            causal.forward_block(torch.randn(1, 16, 2, *GRID), torch.tensor([500.0]), start, kv, cross)
            seen.add((kv.layers[0].k.data_ptr(), kv.slot_index.data_ptr(), kv.slot_in_use.data_ptr()))
    assert len(seen) == 1  # the same buffers every block: what a captured CUDA graph reads
    assert kv.slot_index.tolist() == [2, 3]  # the fourth block took the slots of frames 2, 3
    with pytest.raises(ValueError, match="needs num_frames"):
        CausalWanModel(wan, num_frame_per_block=2).new_kv_cache(static_shapes=True)


def test_causal_pipeline_static_shapes_equals_plain(wan):
    causal = CausalWanModel(wan, num_frame_per_block=2, local_attn_size=4, sink_size=1)
    context = torch.randn(1, 5, 32)
    runs = []
    for static in (False, True):
        pipe = CausalPipeline.few_step(causal, [1000, 500])
        pipe.static_shapes = static
        runs.append(torch.cat(list(pipe.generate(context, 8, GRID, generator=torch.Generator().manual_seed(0))), 2))
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5)
