"""Fast paths and memory features, each against the plain path: fp8 weight storage, block swap and
memory modes, compiled blocks, attention backends, the complex-multiply RoPE, the fused norms, oneDNN
linears. No timing here (see scripts/benchmark.py)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomize, tiny_dit_config
from trainers.parallelize import apply_compile
from wan.fp8 import FP8, FP8_MAX, FP8Linear, fp8_bytes, quantize_fp8, quantize_tensor
from wan.lora import inject_lora
from wan.modules.attention import attention, attention_backend, set_attention_backend
from wan.modules.model import WanModel
from wan.modules.norms import LayerNorm, RMSNorm, fused_norms, modulate
from wan.modules.rope import apply_rope, grid_positions, rope_cos_sin
from wan import onednn_linear as onednn
from wan.offload import MEMORY_MODES, apply_block_swap, apply_memory_mode


def _model(num_layers=3, seed=0):
    return randomize(WanModel(**tiny_dit_config(num_layers=num_layers)), seed=seed).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 3, 4, 6, generator=g), torch.tensor([700.0, 150.0]),
            [torch.randn(5, 32, generator=g), torch.randn(9, 32, generator=g)])


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- fp8 -----------------------------------------------------------------------------------------

def test_fp8_quantize_tensor_scales_to_the_fp8_range():
    w = torch.randn(64, 48) * 3e-3  # small weights: a plain cast would lose them to subnormals
    q, scale = quantize_tensor(w)
    assert q.dtype == FP8 and q.float().abs().max().item() == FP8_MAX
    assert _relative_error(q.float() * scale, w) < 0.04  # 3 mantissa bits: at most 1/16 per value
    plain, one = quantize_tensor(w, scaled=False)
    assert one.item() == 1.0 and _relative_error(plain.float(), w) > 4 * _relative_error(q.float() * scale, w)


def test_fp8_linear_computes_with_the_dequantized_weight():
    linear = nn.Linear(48, 40)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(3, 7, 48)
    expected = F.linear(x, layer.weight.float() * layer.scale_weight, linear.bias)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert _relative_error(layer(x), linear(x)) < 0.04
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_fp8_model_close_to_full_precision_and_half_the_bytes():
    model = _model()
    x, t, context = _inputs()
    with torch.no_grad():
        reference = model(x, t, context)
        before = fp8_bytes(model.blocks)
        names = quantize_fp8(model)
        out = model(x, t, context)
    assert len(names) == 3 * 10 and all(n.startswith("blocks.") for n in names)
    assert fp8_bytes(model.blocks) < 0.3 * before  # fp32 -> fp8 linear weights (norms, biases stay)
    assert _relative_error(out, reference) < 0.05


def test_fp8_state_dict_round_trip_through_a_meta_model():
    model = _model()
    quantize_fp8(model)
    state = model.state_dict()
    assert state["blocks.0.ffn.0.weight"].dtype == FP8 and state["blocks.0.ffn.0.scale_weight"].ndim == 0
    with torch.device("meta"):
        fresh = WanModel(**tiny_dit_config(num_layers=3))
    quantize_fp8(fresh)
    fresh.load_state_dict(state, assign=True)
    x, t, context = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x, t, context), model(x, t, context), atol=0, rtol=0)


def test_fp8_quantize_reports_nothing_to_quantize():
    model = _model()
    quantize_fp8(model)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_fp8(model)


# -- offload -------------------------------------------------------------------------------------

def test_block_swap_inference_equals_resident_model_and_offloads_after_use():
    model = _model()
    x, t, context = _inputs()
    with torch.no_grad():
        reference = model(x, t, context)
    with pytest.raises(ValueError, match="requires_grad_"):
        apply_block_swap(model, 2, "cpu")
    model.requires_grad_(False)
    swapped = apply_block_swap(model, 2, "cpu")
    resident_during = []
    model.blocks[2].register_forward_pre_hook(lambda *_: resident_during.append(swapped[1].resident))
    with torch.no_grad():
        out = model(x, t, context)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    assert resident_during == [True] and not any(s.resident for s in swapped)
    weight = model.blocks[2].ffn[0].weight
    index = next(i for i, tensor in enumerate(swapped[1].tensors) if tensor is weight)
    assert weight.data_ptr() == swapped[1].cpu_data[index].data_ptr()


def test_block_swap_lora_training_gives_the_same_gradients():
    def lora_grads(swap):
        model = _model()
        torch.manual_seed(0)  # lora_A's init
        inject_lora(model, ["blocks.*.self_attn.q", "blocks.*.ffn.2"], rank=2)
        model.set_gradient_checkpointing(True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        if swap:
            apply_block_swap(model, 2, "cpu")
        x, t, context = _inputs()
        model(x, t, context).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, swapped = lora_grads(False), lora_grads(True)
    assert plain.keys() == swapped.keys() and len(plain) == 12
    for name in plain:
        torch.testing.assert_close(swapped[name], plain[name], atol=0, rtol=0, msg=name)


def test_block_swap_training_needs_checkpointing():
    model = _model().requires_grad_(False)
    apply_block_swap(model, 1, "cpu")
    with pytest.raises(RuntimeError, match="set_gradient_checkpointing"):
        model(*_inputs())
    with pytest.raises(ValueError, match="blocks_to_swap"):
        apply_block_swap(model, 4, "cpu")


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_memory_modes_match_the_plain_model(mode):
    x, t, context = _inputs()
    with torch.no_grad():
        reference = _model()(x, t, context)
        out = apply_memory_mode(_model(), mode, "cpu")(x, t, context)
    if mode.endswith("qfloat8"):
        assert _relative_error(out, reference) < 0.05
    else:
        torch.testing.assert_close(out, reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown memory mode"):
        apply_memory_mode(_model(), "gpu", "cpu")


# -- compile, attention, rope ---------------------------------------------------------------------

def test_compiled_blocks_equal_eager():
    torch._dynamo.reset()
    model = _model()
    x, t, context = _inputs()
    with torch.no_grad():
        reference = model(x, t, context)
        apply_compile(model, backend="aot_eager")
        out = model(x, t, context)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    assert "blocks.0.ffn.0.weight" in model.state_dict()
    with pytest.raises(ValueError, match="no WanModel"):
        apply_compile(nn.Linear(2, 2))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_agree(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 1, 9, generator=g)
    reference = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).mT / 4 + mask, -1) @ v.transpose(1, 2)
    with attention_backend(backend):
        out = attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, reference.transpose(1, 2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("xformers")


def test_rope_complex_multiply_equals_the_real_rotation():
    cos, sin = rope_cos_sin(grid_positions(2, 3, 4), 12)
    x = torch.randn(2, 30, 2, 12)  # 6 tokens past the grid stay unrotated
    even, odd = x[:, :24].unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[:, :24], rotated, atol=1e-6, rtol=0)
    assert torch.equal(out[:, 24:], x[:, 24:])
    strided = torch.randn(2, 24, 2, 24)[..., ::2]  # a non-contiguous view
    torch.testing.assert_close(apply_rope(strided, cos, sin), apply_rope(strided.contiguous(), cos, sin))


# -- fused norms ----------------------------------------------------------------------------------

def test_fused_rms_norm_equals_the_plain_path():
    norm = RMSNorm(24, eps=1e-6)
    norm.weight.data = torch.randn(24)
    half = copy.deepcopy(norm).bfloat16()
    x = torch.randn(2, 7, 24)
    with fused_norms(False):
        plain, plain_half = norm(x), half(x.bfloat16())
    torch.testing.assert_close(norm(x), plain, atol=1e-6, rtol=1e-6)
    # half precision keeps the official order: normalize in fp32, cast, then multiply
    assert torch.equal(half(x.bfloat16()), plain_half)


@pytest.mark.parametrize("rows", [1, 7])  # one (shift, scale) row for all tokens (fused) or one per token
def test_fused_layer_norm_modulation_equals_the_plain_path(rows):
    norm = LayerNorm(24)
    x, shift, scale = torch.randn(1, 7, 24), torch.randn(1, rows, 24), torch.randn(1, rows, 24)
    with fused_norms(False):
        plain = norm.modulated(x, shift, scale)
    torch.testing.assert_close(plain, modulate(F.layer_norm(x, (24,), eps=1e-6), shift, scale), atol=0, rtol=0)
    torch.testing.assert_close(norm.modulated(x, shift, scale), plain, atol=1e-6, rtol=1e-6)


def test_fused_norms_model_forward_and_gradients_equal_the_plain_path():
    model = _model(num_layers=2)
    x, t, context = _inputs()
    outputs, grads = [], []
    for fused in (False, True):  # batch 2 (per-sample modulation, plain) and batch 1 (fused adaLN)
        with fused_norms(fused):
            model.zero_grad()
            out = torch.cat([model(x, t, context), model(x[:1], t[:1], context[:1])])
            out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and "blocks.0.modulation" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_residual_stream_is_contiguous_token_major():
    # A [B, C, L] -> [B, L, C] transposed view from the patch embedding would make every block's
    # norms copy it and every residual update run strided.
    model = _model(num_layers=2)
    x, t, context = _inputs()
    layouts = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda block, args: layouts.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(x, t, context)
    assert layouts == [True, True]


# -- oneDNN linears -------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not onednn.onednn_available(), reason="PyTorch built without oneDNN")


def _autograd_ops(tensor):
    """Names of the backward nodes of the graph that made `tensor`."""
    seen, pending = set(), [tensor.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and node not in seen:
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_linear_forward_and_backward(bias, monkeypatch):
    monkeypatch.setattr(onednn, "MIN_ROWS", 4)
    weight = torch.randn(6, 8)
    b = torch.randn(6) if bias else None

    def run(linear, x):
        leaves = [t.detach().requires_grad_(True) for t in (x, weight, b) if t is not None]
        out = linear(*leaves)
        out.backward(torch.ones_like(out) + torch.arange(6.0))
        return out, [t.grad for t in leaves]

    # 3D, strided, 2D, and 3 rows: fewer than MIN_ROWS, left to F.linear
    for x in (torch.randn(2, 5, 8), torch.randn(2, 8, 5).transpose(1, 2), torch.randn(4, 8), torch.randn(3, 8)):
        (out, grads), (expected, expected_grads) = run(onednn.onednn_linear, x), run(F.linear, x)
        assert ("MkldnnConvolutionBackward0" in _autograd_ops(out)) == (x.numel() // 8 >= 4)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@needs_onednn
def test_onednn_linears_model_equals_plain_and_switches_back(monkeypatch):
    monkeypatch.setattr(onednn, "MIN_ROWS", 1)
    model = _model(num_layers=2)
    x, t, context = _inputs()
    keys = list(model.state_dict())
    results = []
    for enabled in (False, True):
        switched = onednn.use_onednn_linears(model, enabled)
        assert switched == (0 if not enabled else sum(type(m) is onednn.OneDNNLinear for m in model.modules()))
        model.zero_grad()
        out = model(x, t, context)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert ("MkldnnConvolutionBackward0" in _autograd_ops(out)) == enabled
    assert switched > 10 and list(model.state_dict()) == keys
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert onednn.use_onednn_linears(model, False) == switched
    assert not any(type(m) is onednn.OneDNNLinear for m in model.modules())
