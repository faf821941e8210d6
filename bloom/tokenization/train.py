"""A small BLOOM-like tokenizer trained offline: BLOOM's pre-tokenizer and special tokens, a byte-level BPE.

`bloom init` writes it next to a random-weight checkpoint so that the whole pipeline (tokenise, generate,
decode) runs without the network; the tests use the same tokenizer. Its vocabulary comes from a short
built-in multilingual sample (SAMPLE_TEXT), so it tokenises any text (every byte is in the alphabet) but
says nothing about BLOOM's real 250k-token vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# BLOOM's special tokens, in the order of their ids (0..3), as in bigscience/tokenizer.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
SPECIAL_TOKEN_NAMES = ("unk_token", "bos_token", "eos_token", "pad_token")
# BLOOM's tokenizer.json pre-tokenizer regex (a word with its leading space; the listed punctuation
# marks, Latin, CJK, Devanagari and Arabic, and whitespace split off).
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"
DEFAULT_VOCAB_SIZE = 700

# Several scripts, punctuation, emoji and code: each kind of input BLOOM's pre-tokenizer treats apart.
SAMPLE_TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog. Hello again, world.",
    "It's a test: we're testing, they've tested, I'm done. Isn't it great?",
    "Bonjour le monde ! Ça va ? Très bien, merci. L'été dernier, nous étions à Paris…",
    "Les élèves français écrivent des phrases où l'on trouve des accents : é, è, ê, à, ù, ç.",
    "你好，世界。今天天气很好、我们去公园散步吧。中文分词是一个有趣的问题。",
    "مرحبا بالعالم، كيف حالك؟ أنا بخير، شكرا لك۔ اللغة العربية جميلة.",
    "नमस्ते दुनिया। आप कैसे हैं? मैं ठीक हूँ। हिंदी भाषा सुंदर है।",
    "Emoji time 🙂🚀👍🏽 and a family 👨‍👩‍👧 with flags 🇫🇷🇮🇳 ✨🎉",
    "def add(a, b):\n    return a + b  # sum of two numbers\n",
    "for (int i = 0; i < n; ++i) { total += values[i]; }\nprintf(\"%d\\n\", total);",
    "import torch\nx = torch.randn(3, 4)\nprint(x.shape)  # torch.Size([3, 4])",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
]

# BLOOM's own tokenizer_config.json (bigscience/bloom*), padding on the left.
BLOOM_TOKENIZER_CONFIG = {
    "tokenizer_class": "BloomTokenizerFast",
    "padding_side": "left",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "name_or_path": "bigscience/tokenizer",
    "special_tokens_map_file": None,
}


def train_bloom_like_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A `tokenizers` byte-level BPE with BLOOM's pre-tokenizer, decoder and special tokens (ids 0-3),
    trained on SAMPLE_TEXT. Deterministic. The vocabulary has at most `vocab_size` tokens (fewer when
    the sample runs out of merges)."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        # below this not every byte has a token, and some text would not encode
        raise ValueError(f"vocab_size must be an int >= {minimum} (4 special tokens + 256 bytes); got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> ever
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer=trainer)
    return tok


def write_tokenizer_dir(path, tok: Tokenizer, config: dict | None = None, special_map: bool = True) -> Path:
    """The raw files of a tokenizer directory: tokenizer.json, and tokenizer_config.json (`config`, if
    given) and special_tokens_map.json (if `special_map`) as written — for tests of unusual files.
    `bloom init` saves through BloomTokenizerFast.save_pretrained instead."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if special_map:
        special = dict(zip(SPECIAL_TOKEN_NAMES, SPECIAL_TOKENS))
        (path / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return path
