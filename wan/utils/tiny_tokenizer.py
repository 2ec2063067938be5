"""A tiny T5-style tokenizer in Hugging Face folder layout, built offline (tests, tiny checkpoints).

Like umT5's tokenizer it uses pad id 0, appends the end-of-sequence token `</s>` (id 1) to every
text and maps unknown words to `<unk>` (id 2). Words split on whitespace and punctuation.
"""

import json
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
WORDS = ("a the of and in on with under over cat dog bird fish tree river city street night day "
         "red blue green small large running sitting flying walking camera video slowly quickly "
         ", . !").split()


def make_tiny_tokenizer(folder, vocab_size=64):
    """Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `folder`.

    The vocabulary is the three special tokens, then `WORDS`, then filler tokens `w<i>` up to
    `vocab_size` entries. Returns `folder` as a Path; `AutoTokenizer.from_pretrained(folder)` loads it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    names = [PAD, EOS, UNK, *WORDS]
    if vocab_size < len(names):
        raise ValueError(f"vocab_size must be at least {len(names)}, got {vocab_size}")
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    vocab = {name: i for i, name in enumerate(names)}

    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    special = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    # Written by hand rather than by `save_pretrained`, whose layout differs between transformers
    # versions; this class name loads in 4.x and 5.x alike.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder
