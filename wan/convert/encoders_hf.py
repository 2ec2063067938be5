"""Text and image encoders in the transformers layout (diffusers folders' `text_encoder/`,
`image_encoder/`) -> the official Wan layout our modules use.

umT5: transformers `UMT5EncoderModel` (`shared`, `encoder.block.{}.layer.{0,1}.*`).
CLIP: transformers `CLIPVisionModel` (`vision_model.*`, separate q/k/v projections, no `head`).
"""

import torch

from .keymap import KeyTable

T5_HF_TABLE = KeyTable([  # first matching row wins: the position bias before the q/k/v/o row
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{}.pos_embedding.embedding.weight", "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{}.attn.{}.weight", "encoder.block.{}.layer.0.SelfAttention.{}.weight"),
    ("blocks.{}.norm1.weight", "encoder.block.{}.layer.0.layer_norm.weight"),
    ("blocks.{}.ffn.gate.0.weight", "encoder.block.{}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{}.ffn.fc1.weight", "encoder.block.{}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{}.ffn.fc2.weight", "encoder.block.{}.layer.1.DenseReluDense.wo.weight"),
    ("blocks.{}.norm2.weight", "encoder.block.{}.layer.1.layer_norm.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
], name="umT5 <-> transformers UMT5EncoderModel")

# Renames only; the fused q/k/v and the reshaped embeddings are handled in `clip_from_hf`.
CLIP_HF_TABLE = KeyTable([
    ("patch_embedding.weight", "embeddings.patch_embedding.weight"),
    ("pre_norm.{}", "pre_layrnorm.{}"),
    ("post_norm.{}", "post_layernorm.{}"),
    ("transformer.{}.attn.proj.{}", "encoder.layers.{}.self_attn.out_proj.{}"),
    ("transformer.{}.norm1.{}", "encoder.layers.{}.layer_norm1.{}"),
    ("transformer.{}.norm2.{}", "encoder.layers.{}.layer_norm2.{}"),
    ("transformer.{}.mlp.0.{}", "encoder.layers.{}.mlp.fc1.{}"),
    ("transformer.{}.mlp.2.{}", "encoder.layers.{}.mlp.fc2.{}"),
], name="CLIP visual <-> transformers CLIPVisionModel")


def is_hf_t5(keys):
    return "shared.weight" in keys or any(k.startswith("encoder.block.") for k in keys)


def t5_from_hf(state_dict):
    # `encoder.embed_tokens` is tied to `shared`; some files store both.
    return T5_HF_TABLE.to_source({k: v for k, v in state_dict.items() if k != "encoder.embed_tokens.weight"})


def t5_to_hf(state_dict):
    return T5_HF_TABLE.to_target(state_dict)


def is_hf_clip(keys):
    return any(k.startswith(("vision_model.", "embeddings.class_embedding")) for k in keys)


def clip_from_hf(state_dict):
    """transformers CLIPVisionModel(WithProjection) state dict -> our `VisionTransformer` keys.
    Without `visual_projection` there is no `head` (build the tower with out_dim=None)."""
    state = {k.removeprefix("vision_model."): v for k, v in state_dict.items()}
    out = {"cls_embedding": state.pop("embeddings.class_embedding").reshape(1, 1, -1),
           "pos_embedding": state.pop("embeddings.position_embedding.weight")[None]}
    state.pop("embeddings.position_ids", None)
    projection = state.pop("visual_projection.weight", None)
    if projection is not None:
        out["head"] = projection.t().contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        prefix = f"encoder.layers.{i}.self_attn."
        for part in ("weight", "bias"):
            out[f"transformer.{i}.attn.to_qkv.{part}"] = torch.cat(
                [state.pop(f"{prefix}{p}_proj.{part}") for p in ("q", "k", "v")])
    out.update(CLIP_HF_TABLE.to_source(state))
    return out


def clip_to_hf(state_dict):
    """Our `VisionTransformer` state dict -> transformers CLIPVisionModelWithProjection keys
    (`vision_model.*` + `visual_projection`)."""
    state = dict(state_dict)
    out = {"embeddings.class_embedding": state.pop("cls_embedding").reshape(-1),
           "embeddings.position_embedding.weight": state.pop("pos_embedding")[0]}
    head = state.pop("head", None)
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer.")})
    for i in layers:
        for part in ("weight", "bias"):
            q, k, v = state.pop(f"transformer.{i}.attn.to_qkv.{part}").chunk(3)
            for name, tensor in zip("qkv", (q, k, v)):
                out[f"encoder.layers.{i}.self_attn.{name}_proj.{part}"] = tensor.contiguous()
    out.update(CLIP_HF_TABLE.to_target(state))
    out = {f"vision_model.{k}": v for k, v in out.items()}
    if head is not None:
        out["visual_projection.weight"] = head.t().contiguous()
    return out
