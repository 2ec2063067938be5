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


def t5_config_from_hf(config):
    """transformers UMT5Config dict -> `T5Encoder` arguments."""
    return dict(vocab=config["vocab_size"], dim=config["d_model"], dim_attn=config["num_heads"] * config["d_kv"],
                dim_ffn=config["d_ff"], num_heads=config["num_heads"], num_layers=config["num_layers"],
                num_buckets=config["relative_attention_num_buckets"], shared_pos=False, dropout=0.0)


def t5_config_to_hf(config):
    """`T5Encoder` arguments -> transformers UMT5Config keyword arguments."""
    return dict(vocab_size=config["vocab"], d_model=config["dim"], d_kv=config["dim_attn"] // config["num_heads"],
                d_ff=config["dim_ffn"], num_heads=config["num_heads"], num_layers=config["num_layers"],
                relative_attention_num_buckets=config["num_buckets"], feed_forward_proj="gated-gelu",
                dropout_rate=0.0, tie_word_embeddings=False)


def clip_config_from_hf(config, has_projection):
    """transformers CLIPVisionConfig dict -> `VisionTransformer` arguments."""
    dim = config["hidden_size"]
    return dict(image_size=config["image_size"], patch_size=config["patch_size"], dim=dim,
                mlp_ratio=config["intermediate_size"] // dim, num_heads=config["num_attention_heads"],
                num_layers=config["num_hidden_layers"], activation=config.get("hidden_act", "gelu"),
                norm_eps=config.get("layer_norm_eps", 1e-5),
                out_dim=config.get("projection_dim") if has_projection else None)


def clip_config_to_hf(config):
    """`VisionTransformer` arguments -> transformers CLIPVisionConfig keyword arguments."""
    dim = config["dim"]
    return dict(hidden_size=dim, intermediate_size=config["mlp_ratio"] * dim, num_attention_heads=config["num_heads"],
                num_hidden_layers=config["num_layers"], image_size=config["image_size"],
                patch_size=config["patch_size"], hidden_act=config.get("activation", "gelu"),
                layer_norm_eps=config.get("norm_eps", 1e-5), projection_dim=config.get("out_dim") or dim)
