"""Prompts -> umT5 embeddings for the DiT, with device placement and a cache of encoded prompts.

The outputs are trimmed to each prompt's token count (end token included); the DiT pads them to
its text_len itself. The encoder can live on the CPU while the DiT holds the GPU: pass
`device='cpu'` and an `output_device`.
"""

from collections import OrderedDict

import torch

from .t5 import load_t5_encoder
from .tokenizers import HuggingfaceTokenizer


class T5TextEncoder:
    """Encodes prompts with a `T5Encoder` and a `HuggingfaceTokenizer`.

    Args:
        model: the encoder (its device is where encoding runs).
        tokenizer: tokenizes to fixed-length ids and masks.
        output_device: where `encode` returns its tensors by default (default: the model's device).
        cache_size: how many distinct prompts to keep encoded (least recently used dropped first),
            so a prompt used again, such as the negative prompt, is encoded once; 0 disables.
    """

    def __init__(self, model, tokenizer, output_device=None, cache_size=32):
        self.model = model
        self.tokenizer = tokenizer
        self.output_device = output_device
        self.cache_size = cache_size
        self._cache = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def from_checkpoint(cls, checkpoint_path, tokenizer_path, text_len=512, dtype=torch.bfloat16, device="cpu",
                        output_device=None, cache_size=32, **config):
        """Loads `models_t5_umt5-xxl-enc-bf16.pth` and the tokenizer folder `google/umt5-xxl`.

        `config` overrides `T5Encoder` arguments (the defaults are umT5-XXL).
        """
        tokenizer = HuggingfaceTokenizer(tokenizer_path, text_len=text_len)
        model = load_t5_encoder(checkpoint_path, dtype=dtype, device=device, **config)
        return cls(model, tokenizer, output_device, cache_size)

    @property
    def device(self):
        return self.model.token_embedding.weight.device

    def to(self, device):
        """Moves the model (e.g. to offload it between uses); returns self."""
        self.model.to(device)
        return self

    def clear_cache(self):
        self._cache.clear()

    @torch.no_grad()
    def _run(self, prompts):
        """Encodes B prompts in one batch -> list of [L_i, dim] tensors on the model's device."""
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(ids, mask)
        # Clones, so that a cached prompt does not keep the whole padded batch alive.
        return [h[:n].clone() for h, n in zip(hidden, mask.sum(dim=1).tolist())]

    def encode(self, prompts, device=None):
        """prompts: a prompt or a list of B prompts -> list of B tensors [L_i, dim].

        L_i is prompt i's token count. Tensors land on `device`, else `output_device`, else the
        model's device. A cached tensor may be returned as is: do not modify results in place.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        found = {}
        for prompt in dict.fromkeys(prompts):
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        misses = [p for p in dict.fromkeys(prompts) if p not in found]
        self.cache_hits += len(found)
        self.cache_misses += len(misses)
        if misses:
            found.update(zip(misses, self._run(misses)))
            self._remember({p: found[p] for p in misses})
        target = device or self.output_device or self.device
        return [found[p].to(target) for p in prompts]

    def _remember(self, encoded):
        if self.cache_size <= 0:
            return
        self._cache.update(encoded)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def __call__(self, prompts, device=None):
        """The official call form, `text_encoder(prompts, device)`."""
        return self.encode(prompts, device)
