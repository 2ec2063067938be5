"""Prompt tokenization: a Hugging Face tokenizer folder read from local disk, with Wan's text cleaning.

The official checkpoints ship the umT5 tokenizer as the folder `google/umt5-xxl/`. Prompts are
cleaned as the official code does (ftfy, HTML entities, whitespace), then padded or truncated to a
fixed `text_len` with the end-of-sequence token appended.
"""

import html
import re
from pathlib import Path

import ftfy


def clean_prompt(text):
    """Repairs mojibake, decodes HTML entities (twice, for double-escaped text) and collapses whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


class HuggingfaceTokenizer:
    """Tokenizes prompts to fixed-length ids and attention masks.

    Args:
        path: a tokenizer folder (`tokenizer.json` and/or `spiece.model`, `tokenizer_config.json`).
            Nothing is downloaded: the folder must exist locally.
        text_len: every output has this many tokens (padded, or truncated keeping the end token).
        clean: apply `clean_prompt` first, as the official pipelines do.
    """

    def __init__(self, path, text_len=512, clean=True):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer folder not found: {path}; pass the local tokenizer folder of the checkpoint "
                f"(for Wan: <checkpoint dir>/google/umt5-xxl), nothing is downloaded")
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            found = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(f"cannot load a tokenizer from {path} (it holds {found}); expected "
                                    f"tokenizer.json or spiece.model with tokenizer_config.json") from err
        self.path = path
        self.text_len = text_len
        self.clean = clean

    def __call__(self, texts):
        """texts: a prompt or a list of B prompts -> (ids [B, text_len] int64, mask [B, text_len] int64).

        mask is 1 on the prompt's tokens (end token included) and 0 on padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        if self.clean:
            texts = [clean_prompt(t) for t in texts]
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_len,
                               add_special_tokens=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]
