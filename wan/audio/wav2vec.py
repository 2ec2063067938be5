"""Speech features from a local wav2vec2 folder through transformers' `Wav2Vec2Model`.

Two references use it:
- StableAvatar: `facebook/wav2vec2-base-960h` (post-LN layers), the last hidden state [1, T, 768] of
  each window's audio slice, normalised over that slice (`Wav2Vec2Processor`, do_normalize).
- Wan2.2 S2V: `wav2vec2-large-xlsr-53-english` (pre-LN "stable layer norm" layers), all hidden
  states [25, T, 1024] of the whole clip, normalised over the clip.

transformers 4.x (the references' pin) returned as the last of `hidden_states` the encoder's output
after its final LayerNorm (pre-LN models have one); transformers 5 records the last layer's output
*before* it. `all_hidden_states` therefore collects the inputs of the layers itself and appends the
final `last_hidden_state`, the 4.x values under any transformers version. The last hidden state
itself is the same in both (post-LN models have no final LayerNorm).

wav2vec2 emits 50 tokens per second at 16 kHz (conv strides multiply to 320 samples); an input of
fewer than 400 samples (the receptive field of the conv stack) gives no token.
"""

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SAMPLES = 400
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


def normalize_waveform(waveform):
    """[..., N] -> (x - mean) / sqrt(var + 1e-7) over the last dim (biased variance), as the
    feature extractor's do_normalize; computed in float64, returned as float32."""
    x = waveform.double()
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return ((x - mean) / torch.sqrt(var + NORM_EPS)).float()


class Wav2Vec2Features:
    """A `Wav2Vec2Model` in eval mode with its feature extractor's normalisation flag."""

    def __init__(self, model, do_normalize=True):
        self.model = model.eval().requires_grad_(False)
        self.do_normalize = do_normalize

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype=torch.float32):
        """Loads a local Hugging Face wav2vec2 folder (config.json + weights; a `Wav2Vec2ForCTC` hub
        checkpoint works: its `wav2vec2.` prefix is stripped and `lm_head` left out). No network."""
        from transformers import Wav2Vec2Model

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no wav2vec2 model in {folder}: expected config.json and the weights of a "
                                    f"Hugging Face wav2vec2 folder (e.g. facebook/wav2vec2-base-960h)")
        model, info = Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                    dtype=dtype)
        # masked_spec_embed is a training-only parameter absent from CTC checkpoints.
        missing = [k for k in info["missing_keys"] if k != "masked_spec_embed"]
        if missing:
            raise ValueError(f"wav2vec2 weights in {folder} lack {len(missing)} keys, e.g. {missing[:5]}")
        extractor = folder / "preprocessor_config.json"
        do_normalize = json.loads(extractor.read_text()).get("do_normalize", True) if extractor.is_file() else True
        log.info("wav2vec2 from %s: %d layers, width %d, do_normalize %s (unused checkpoint keys: %d)", folder,
                 model.config.num_hidden_layers, model.config.hidden_size, do_normalize,
                 len(info["unexpected_keys"]))
        return cls(model.to(device), do_normalize)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def input_values(self, waveform):
        """[N] 16 kHz samples -> [1, N] model input (normalised over these samples if do_normalize)."""
        waveform = torch.as_tensor(waveform).float().reshape(1, -1)
        if waveform.shape[1] < MIN_SAMPLES:
            raise ValueError(f"wav2vec2 needs at least {MIN_SAMPLES} samples (25 ms at 16 kHz), "
                             f"got {waveform.shape[1]}")
        values = normalize_waveform(waveform) if self.do_normalize else waveform
        return values.to(self.device, self.dtype)

    @torch.no_grad()
    def last_hidden_state(self, waveform):
        """[N] samples -> [1, T, C] encoder output, T = 50 tokens per second (StableAvatar)."""
        return self.model(self.input_values(waveform)).last_hidden_state

    @torch.no_grad()
    def all_hidden_states(self, waveform):
        """[N] samples -> [layers + 1, T, C]: the input of every encoder layer, then the encoder output
        (after the final LayerNorm of pre-LN models): transformers 4.x `hidden_states` (Wan2.2 S2V)."""
        inputs = []
        hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
                 for layer in self.model.encoder.layers]
        try:
            last = self.model(self.input_values(waveform)).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat(inputs + [last], dim=0)
