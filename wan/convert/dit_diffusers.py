"""WanModel <-> diffusers `WanTransformer3DModel`: key table and config mapping."""

from .keymap import KeyTable

_ATTENTION = [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
              ("norm_k", "norm_k")]
_IMAGE_ATTENTION = [("k_img", "add_k_proj"), ("v_img", "add_v_proj"), ("norm_k_img", "norm_added_k")]

DIT_DIFFUSERS_TABLE = KeyTable(
    [("patch_embedding.{}", "patch_embedding.{}"),
     ("text_embedding.0.{}", "condition_embedder.text_embedder.linear_1.{}"),
     ("text_embedding.2.{}", "condition_embedder.text_embedder.linear_2.{}"),
     ("time_embedding.0.{}", "condition_embedder.time_embedder.linear_1.{}"),
     ("time_embedding.2.{}", "condition_embedder.time_embedder.linear_2.{}"),
     ("time_projection.1.{}", "condition_embedder.time_proj.{}"),
     ("img_emb.proj.0.{}", "condition_embedder.image_embedder.norm1.{}"),
     ("img_emb.proj.1.{}", "condition_embedder.image_embedder.ff.net.0.proj.{}"),
     ("img_emb.proj.3.{}", "condition_embedder.image_embedder.ff.net.2.{}"),
     ("img_emb.proj.4.{}", "condition_embedder.image_embedder.norm2.{}"),
     ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
     ("head.head.{}", "proj_out.{}"),
     ("head.modulation", "scale_shift_table"),
     ("blocks.{}.modulation", "blocks.{}.scale_shift_table"),
     # diffusers numbers the block norms in call order: our norm3 (before cross-attention) is its norm2
     ("blocks.{}.norm3.{}", "blocks.{}.norm2.{}"),
     ("blocks.{}.ffn.0.{}", "blocks.{}.ffn.net.0.proj.{}"),
     ("blocks.{}.ffn.2.{}", "blocks.{}.ffn.net.2.{}")]
    + [(f"blocks.{{}}.self_attn.{ours}.{{}}", f"blocks.{{}}.attn1.{theirs}.{{}}") for ours, theirs in _ATTENTION]
    + [(f"blocks.{{}}.cross_attn.{ours}.{{}}", f"blocks.{{}}.attn2.{theirs}.{{}}")
       for ours, theirs in _ATTENTION + _IMAGE_ATTENTION],
    name="WanModel <-> diffusers WanTransformer3DModel")


def is_diffusers_dit(keys):
    return any(k.startswith("condition_embedder.") for k in keys)


def dit_to_diffusers(state_dict):
    return DIT_DIFFUSERS_TABLE.to_target(state_dict)


# Keys some diffusers-layout files carry that no module has (SkyReels-A2 lists `norm_added_q` as
# ignorable on load, but never creates it): dropped on conversion.
IGNORED_DIFFUSERS_KEYS = (".attn2.norm_added_q.",)


def dit_from_diffusers(state_dict):
    return DIT_DIFFUSERS_TABLE.to_source({k: v for k, v in state_dict.items()
                                          if not any(part in k for part in IGNORED_DIFFUSERS_KEYS)})


def config_to_diffusers(config):
    """WanModel constructor arguments -> diffusers `WanTransformer3DModel` config."""
    dim, num_heads = config["dim"], config["num_heads"]
    image_branch = config.get("image_branch")
    if image_branch is None:
        image_branch = config.get("model_type", "t2v") in ("i2v", "flf2v")
    return dict(
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=config.get("in_dim", 16),
        out_channels=config.get("out_dim", 16),
        text_dim=config.get("text_dim", 4096),
        freq_dim=config.get("freq_dim", 256),
        ffn_dim=config["ffn_dim"],
        num_layers=config["num_layers"],
        cross_attn_norm=config.get("cross_attn_norm", True),
        qk_norm="rms_norm_across_heads" if config.get("qk_norm", True) else None,
        eps=config.get("eps", 1e-6),
        image_dim=config.get("clip_dim", 1280) if image_branch else None,
        added_kv_proj_dim=dim if image_branch else None,
        pos_embed_seq_len=2 * config.get("clip_tokens", 257) if config.get("model_type") == "flf2v" else None,
    )


def config_from_diffusers(config):
    """diffusers `WanTransformer3DModel` config -> WanModel constructor arguments."""
    num_heads = config["num_attention_heads"]
    in_dim, out_dim = config.get("in_channels", 16), config.get("out_channels", 16)
    image_branch = config.get("image_dim") is not None
    if config.get("pos_embed_seq_len"):
        model_type = "flf2v"
    elif image_branch or in_dim != out_dim and in_dim > out_dim:
        model_type = "i2v"
    elif out_dim == 48:
        model_type = "ti2v"
    else:
        model_type = "t2v"
    # diffusers has no text_len (its pipelines pad prompts to max_sequence_length, 512 by default):
    # it comes from the pipeline preset, else WanModel's default.
    return dict(
        model_type=model_type,
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        in_dim=in_dim,
        dim=num_heads * config["attention_head_dim"],
        ffn_dim=config["ffn_dim"],
        freq_dim=config.get("freq_dim", 256),
        text_dim=config.get("text_dim", 4096),
        out_dim=out_dim,
        num_heads=num_heads,
        num_layers=config["num_layers"],
        qk_norm=config.get("qk_norm") is not None,
        cross_attn_norm=config.get("cross_attn_norm", True),
        eps=config.get("eps", 1e-6),
        image_branch=image_branch,
        clip_dim=config.get("image_dim") or 1280,
        clip_tokens=(config.get("pos_embed_seq_len") or 514) // 2,
    )
