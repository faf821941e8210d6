"""Small helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

import json

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HAS_CUDA = torch.cuda.is_available()
# The device the Triton kernels run on in this session: the GPU, or the CPU through the interpreter.
KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --- random BLOOM weights and batches ----------------------------------------------------------------
def peaked_causal_lm_pair(config: dict, noise: float, seed: int = 0):
    """(ours, transformers') BloomForCausalLM on the same weights: transformers' random init plus
    `noise` x N(0, 1) on every parameter, so next-token distributions are peaked (greedy is not a coin
    toss) and still differ between beams. Needs transformers."""
    import transformers

    from bloom import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    theirs = transformers.BloomForCausalLM(transformers.BloomConfig(**config)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(noise * torch.randn_like(p))
    ours = BloomForCausalLM(BloomConfig(**config)).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that keep the network well conditioned (LN weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name or "ln_f" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def left_padding_mask(key_len: int, *, lengths=None, pads=None, dtype=torch.int64, device="cpu") -> torch.Tensor:
    """(B, Sk) 0/1 attention mask of a left-padded batch, as batched generation makes it: row b has
    `lengths[b]` real tokens at the end (1) after `pads[b] = Sk - lengths[b]` padding slots (0).
    Give either `lengths` or `pads`; B is their count."""
    if (lengths is None) == (pads is None):
        raise TypeError("left_padding_mask: give exactly one of lengths= and pads=")
    pads = [key_len - n for n in lengths] if pads is None else list(pads)
    mask = torch.ones(len(pads), key_len, dtype=dtype)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask.to(device)


def left_padded_batch(vocab: int, lengths=(9, 6, 3), seed: int = 1, pad_id: int = 3):
    """Random token ids (B, max(lengths)) left padded with `pad_id`, and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), total), generator=gen)
    mask = left_padding_mask(total, lengths=lengths)
    ids[mask == 0] = pad_id
    return ids, mask


# --- a tiny BLOOM-like tokenizer, trained offline --------------------------------------------------
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# BLOOM's tokenizer.json pre-tokenizer regex (a word with its leading space; the listed punctuation
# marks, Latin, CJK, Devanagari and Arabic, and whitespace split off).
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"

CORPUS = [
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

def train_bloom_like_tokenizer() -> Tokenizer:
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
        vocab_size=700,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> ever
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def write_tokenizer_dir(path, tok: Tokenizer, config: dict | None = None, special_map: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if special_map:
        names = ("unk_token", "bos_token", "eos_token", "pad_token")
        (path / "special_tokens_map.json").write_text(json.dumps(dict(zip(names, SPECIAL_TOKENS))), encoding="utf-8")
    return path


# BLOOM's own tokenizer_config.json (bigscience/bloom*), padding on the left.
BLOOM_CONFIG = {
    "tokenizer_class": "BloomTokenizerFast",
    "padding_side": "left",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "name_or_path": "bigscience/tokenizer",
    "special_tokens_map_file": None,
}
