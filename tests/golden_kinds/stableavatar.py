"""Golden runners of the StableAvatar family (Francis-Rings/StableAvatar): the transformer with its
audio branch, the vocal projector, wav2vec2 window features and the long-video pipeline."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from pipelines.stableavatar import AvatarSettings, StableAvatarPipeline, flow_euler_schedule
from wan.audio.wav2vec import Wav2Vec2Features
from wan.checkpoint import load_state_dict
from wan.modules.stableavatar import StableAvatarModel
from wan.modules.vocal_projector import VocalProjector, audio_window_ranges, audio_windows

golden_dir(EXT_DIR / "stableavatar" / "golden", "stableavatar_transformer", "vocal_projector", "wav2vec_features",
           "stableavatar_long_pipeline")


def build_wav2vec(config, params, do_normalize=True):
    """A transformers `Wav2Vec2Model` of the case's config with its parameters."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(**config))
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and set(missing) <= {"masked_spec_embed"}, (missing, unexpected)
    return Wav2Vec2Features(model, do_normalize)


@runner("wav2vec_features")
def run_wav2vec_features(case):
    config = case.config
    encoder = build_wav2vec(config["wav2vec"], case.params, config["feature_extractor"]["do_normalize"])
    waveform = case.inputs["waveform"]
    for k, window in enumerate(case.meta["windows"]):
        start, end = window["audio_samples"]
        audio = waveform[torch.arange(start, end) % len(waveform)]
        assert_close(encoder.input_values(audio), case.outputs[f"input_values_w{k}"], name=f"input_values_w{k}")
        assert_close(encoder.last_hidden_state(audio), case.outputs[f"last_hidden_state_w{k}"],
                     name=f"last_hidden_state_w{k}")


def build_transformer(config, params, source):
    with torch.device("meta"):
        model = StableAvatarModel.from_config(config)
    return load_state_dict(model, params, source=source).eval()


def guided(pred, audio_scale, text_scale):
    """Rows (no text, no audio), (no text, audio), (text, audio) -> u + s_a (a - u) + s_t (c - a)."""
    uncond, audio, cond = pred.unbind(0)
    return (uncond + audio_scale * (audio - uncond) + text_scale * (cond - audio))[None]


@runner("stableavatar_transformer")
def run_stableavatar_transformer(case):
    model = build_transformer(case.config, case.params, case.path.name)
    inputs, meta = case.inputs, case.meta
    batch = inputs["x"].shape[0]
    audio = inputs["vocal_embeddings"]
    # The released model projects only the last row's audio and gives the first row zero tokens.
    audio_mask = torch.tensor([batch == 1] + [True] * (batch - 1))
    audio = audio[-1:].expand_as(audio) if batch > 1 else audio
    context = [inputs[f"context{i}"] for i in range(batch)]
    kwargs = dict(y=inputs["y"], clip_fea=inputs["clip_fea"], audio=audio, audio_mask=audio_mask,
                  num_frames=meta["video_sample_n_frames"], seq_len=meta["seq_len"],
                  clip_level=meta["is_clip_level_modeling"])
    with torch.no_grad():
        out = model(inputs["x"], inputs["t"], context, **kwargs)
        tokens, _ = model.embed_tokens(torch.cat([inputs["x"], inputs["y"]], 1)[-1:])
        tokens = torch.nn.functional.pad(tokens, (0, 0, 0, meta["seq_len"] - tokens.shape[1]))
        e, e0 = model.embed_time(inputs["t"][-1:], tokens.shape[1])
        vocal = model.vocal_tokens(audio[-1:], meta["video_sample_n_frames"], tokens, e0[:, 0], e[:, 0])
    assert_close(vocal, case.outputs["vocal_tokens"], name="vocal_tokens")
    assert_close(out, case.outputs["noise_pred"], name="noise_pred")
    if "guided" in case.outputs:
        assert_close(guided(out, meta["audio_guide_scale"], meta["text_guide_scale"]), case.outputs["guided"],
                     name="guided")


@runner("vocal_projector")
def run_vocal_projector(case):
    with torch.device("meta"):
        model = VocalProjector(**case.config)
    model = load_state_dict(model, case.params, source=case.path.name).eval()
    inputs, frames = case.inputs, case.meta["video_sample_n_frames"]
    with torch.no_grad():
        proj = model.proj_model(inputs["vocal_embeddings"])
        ranges = audio_window_ranges(proj.shape[1], frames, case.config["expand_length"])
        split, lengths = audio_windows(proj, ranges)
        out = model(inputs["vocal_embeddings"], frames, inputs["latents"], inputs["e0"], inputs["e"])
    assert ranges == case.meta["expanded_ranges_inclusive"]
    assert lengths.tolist() == case.outputs["context_lens"].tolist()
    assert_close(proj, case.outputs["proj"], name="proj")
    assert_close(split, case.outputs["split"], name="split")
    assert_close(out, case.outputs["context_tokens"], name="context_tokens")


def split_params(params, prefix):
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


@runner("stableavatar_long_pipeline")
def run_stableavatar_long_pipeline(case):
    config, inputs = case.config, case.inputs
    dit = build_transformer(config["transformer"], split_params(case.params, "transformer."), case.path.name)
    wav2vec = build_wav2vec(config["wav2vec"], split_params(case.params, "wav2vec."),
                            config["wav2vec_feature_extractor"]["do_normalize"])
    pipeline = StableAvatarPipeline(dit, None, None, None, wav2vec, negative_prompt=None)
    settings = AvatarSettings(clip_frames=config["clip_length"], overlap=config["overlap_window_length"],
                              overlap_weights=config["overlapping_weight_scheme"],
                              sample_steps=config["num_inference_steps"], sample_shift=config["scheduler"]["shift"],
                              text_guide_scale=config["text_guide_scale"],
                              audio_guide_scale=config["audio_guide_scale"]).check()
    schedule = flow_euler_schedule(settings.sample_steps, settings.sample_shift)
    assert_close(schedule.sigmas, case.outputs["sigmas"], atol=1e-6, name="sigmas")
    assert_close(schedule.timesteps, case.outputs["timesteps"], atol=1e-3, name="timesteps")
    latents = pipeline.denoise(inputs["noise"], inputs["waveform"], inputs["prompt_embeds"],
                               inputs["negative_prompt_embeds"], inputs["y"], inputs["clip_fea"], settings,
                               reference_windows=True, progress=False)
    assert_close(latents, case.outputs["latents"], name="latents")
