"""bloom.tokenizer.BloomTokenizerFast against transformers' fast tokenizer on the same files.

No network: a byte-level BPE tokenizer with BLOOM's pipeline (pre-tokenizer, decoder, post-processor,
special tokens <unk> <s> </s> <pad> = 0..3) is trained here on a small multilingual corpus and saved
with a tokenizer_config.json saying padding_side="left", as BLOOM's does. transformers 5 removed
BloomTokenizerFast; its AutoTokenizer maps the class name to the generic fast tokenizer
(PreTrainedTokenizerFast), which is the oracle for every encoding, padding, truncation and decoding.
"""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from bloom.tokenizer import BatchEncoding, BloomTokenizerFast
from helpers import BLOOM_CONFIG, SPECIAL_TOKENS, train_bloom_like_tokenizer, write_tokenizer_dir

transformers = pytest.importorskip("transformers")

# Texts compared against transformers: all the scripts above, spacing corner cases, characters never
# seen in training (covered by the byte alphabet), special tokens written in the text, the empty text.
TEXTS = [
    "Hello world",
    " Hello world",
    "Bonjour, ça va? Très bien… merci!",
    "你好，世界。今天天气很好、对吧？",
    "مرحبا بالعالم، كيف حالك؟ ۔",
    "नमस्ते दुनिया। आप कैसे हैं?",
    "emoji 🙂🚀👍🏽 and 👨‍👩‍👧 family",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "   leading and trailing spaces   ",
    "unseen: Ωmega ẞ ﬁ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃",
    "<s>special tokens inside</s> the text<pad>",
    "It's what we're doing , isn't it ?",
    "",
]
BATCH = [
    "Hello world",
    "你好，世界。今天天气很好",
    "emoji 🙂🚀",
    "def f(x):\n    return x * 2\n",
    "Bonjour !",
]


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    return train_bloom_like_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, backend):
    return write_tokenizer_dir(tmp_path_factory.mktemp("bloom_tok"), backend, BLOOM_CONFIG)


@pytest.fixture
def ours(tok_dir) -> BloomTokenizerFast:
    return BloomTokenizerFast.from_pretrained(tok_dir)


@pytest.fixture
def ref(tok_dir):
    """transformers' fast tokenizer on the same directory (a fresh one per test: tests change sides)."""
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _plain(enc) -> dict:
    """A BatchEncoding (ours or transformers') as {key: python lists} for exact comparison."""
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dict(enc).items()}


# ---------------------------------------------------------------- the fixture is BLOOM's pipeline


def test_fixture_reproduces_bloom_pipeline(ours, backend):
    splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str("Hello, world! 你好。ok")]
    # BLOOM splits off punctuation and keeps the leading space with the word (as Ġ).
    assert splits == ["Hello", ",", "Ġworld", "!", "Ġä½łå¥½", "ãĢĤ", "ok"]
    assert [ours.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert len(ours) > 400  # BPE learned merges: encodings are not just bytes
    assert len(ours.encode("Hello world")) < len("Hello world".encode())


# ---------------------------------------------------------------- encoding


def test_hello_world_matches_transformers(ours, ref):
    ids = ours("Hello world")["input_ids"]
    assert ids == ref("Hello world")["input_ids"]
    assert ids == transformers.PreTrainedTokenizerFast(tokenizer_file=str(ours.name_or_path) + "/tokenizer.json")(
        "Hello world"
    )["input_ids"]
    # BLOOM's post-processor is ByteLevel: add_special_tokens=True adds no BOS/EOS.
    assert ours("Hello world", add_special_tokens=False)["input_ids"] == ids
    assert not {ours.bos_token_id, ours.eos_token_id} & set(ids)
    # A leading space changes the first token, as the BLOOM docs show ([59414, 8876] vs [86153, 8876]).
    spaced = ours(" Hello world")["input_ids"]
    assert spaced != ids and spaced[-1] == ids[-1]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_single_text_matches_transformers(ours, ref, text):
    assert _plain(ours(text)) == _plain(ref(text))
    assert ours.encode(text) == ref.encode(text)
    assert ours.tokenize(text) == ref.tokenize(text)
    ids = ref.encode(text)
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert _plain(ours(text, return_tensors="pt")) == _plain(ref(text, return_tensors="pt"))
    assert ours(text, return_tensors="pt")["input_ids"].shape == (1, len(ids))


def test_batch_without_padding_matches_transformers(ours, ref):
    assert _plain(ours(TEXTS)) == _plain(ref(TEXTS))
    assert _plain(ours(tuple(BATCH))) == _plain(ref(list(BATCH)))


@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
@pytest.mark.parametrize("padding", [True, "longest", "max_length"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers(ours, ref, side, padding, return_tensors):
    kw = dict(padding=padding, padding_side=side, return_tensors=return_tensors)
    if padding == "max_length":
        kw["max_length"] = 31  # longer than every sequence of BATCH: all get padded
    got, want = ours(BATCH, **kw), ref(BATCH, **kw)
    assert _plain(got) == _plain(want)
    ids, mask = np.asarray(_plain(got)["input_ids"]), np.asarray(_plain(got)["attention_mask"])
    assert ids.shape == (len(BATCH), 31 if padding == "max_length" else max(len(ours.encode(t)) for t in BATCH))
    # Independent of transformers: pads sit on the requested side and the mask marks them.
    assert ((ids == ours.pad_token_id) == (mask == 0)).all()
    edge = 0 if side == "left" else -1
    assert (mask[:, edge] == 0).any() and (mask[:, -1 - edge] == 1).all()
    if return_tensors == "pt":
        assert got["input_ids"].dtype == torch.long and got["attention_mask"].dtype == torch.long


def test_default_padding_side_comes_from_config(tmp_path, backend, ours, ref):
    assert ours.padding_side == ref.padding_side == "left"
    assert _plain(ours(BATCH, padding=True)) == _plain(ref(BATCH, padding=True))
    masks = ours(BATCH, padding=True)["attention_mask"]
    lengths = [len(ours.encode(t)) for t in BATCH]
    assert len(set(lengths)) > 1
    for mask, n in zip(masks, lengths):  # padded on the left: zeros first, then the n real tokens
        assert mask == [0] * (len(mask) - n) + [1] * n

    right = write_tokenizer_dir(tmp_path / "right", backend, {**BLOOM_CONFIG, "padding_side": "right"})
    assert BloomTokenizerFast.from_pretrained(right).padding_side == "right"
    assert BloomTokenizerFast.from_pretrained(right, padding_side="left").padding_side == "left"
    # No tokenizer_config.json at all: BLOOM's default, left.
    bare = write_tokenizer_dir(tmp_path / "bare", backend, config=None, special_map=False)
    bare_tok = BloomTokenizerFast.from_pretrained(bare)
    assert bare_tok.padding_side == "left" and bare_tok.pad_token_id == 3 and bare_tok.unk_token == "<unk>"


def test_special_tokens_map_overrides_config(tmp_path, backend):
    # Older configs store special tokens as serialized AddedTokens; special_tokens_map.json wins over
    # tokenizer_config.json, and keyword arguments over both (transformers' precedence).
    config = {**BLOOM_CONFIG, "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False}}
    d = write_tokenizer_dir(tmp_path / "map", backend, config, special_map=False)
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "</s>"}}), encoding="utf-8")
    ours, ref = BloomTokenizerFast.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert (ours.eos_token, ours.pad_token) == (ref.eos_token, ref.pad_token) == ("</s>", "</s>")
    assert _plain(ours(BATCH, padding=True)) == _plain(ref(BATCH, padding=True))
    assert BloomTokenizerFast.from_pretrained(d, pad_token="<pad>").pad_token_id == 3


def test_padding_a_single_text_and_pad_to_multiple_of(ours, ref):
    for kw in (dict(padding=True), dict(padding="max_length", max_length=12), dict(padding=True, pad_to_multiple_of=8)):
        assert _plain(ours("Hello world", **kw)) == _plain(ref("Hello world", **kw)), kw
        assert _plain(ours(BATCH, **kw)) == _plain(ref(BATCH, **kw)), kw
    assert ours(BATCH, padding=True, pad_to_multiple_of=8, return_tensors="pt")["input_ids"].shape[1] % 8 == 0


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # transformers' warning, on the reference
@pytest.mark.parametrize("truncation_side", ["right", "left"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(truncation=True, max_length=5),
        dict(truncation="longest_first", max_length=5),
        dict(max_length=4),  # transformers: max_length alone truncates
        dict(truncation=True, max_length=6, padding="max_length"),
        dict(truncation=True, max_length=7, padding=True, return_tensors="pt"),
        dict(truncation=False, max_length=3, padding=True),  # padding=True pads to the longest, no cut
    ],
    ids=["true", "longest_first", "max_length_only", "pad_max_length", "pad_longest_pt", "no_truncation"],
)
def test_truncation_matches_transformers(ours, ref, truncation_side, kw):
    ours.truncation_side = ref.truncation_side = truncation_side
    assert _plain(ours(BATCH, **kw)) == _plain(ref(BATCH, **kw))
    assert _plain(ours(TEXTS[2], **kw)) == _plain(ref(TEXTS[2], **kw))
    if kw.get("truncation", True) is not False:
        full = ours.encode(TEXTS[2])
        cut = ours.encode(TEXTS[2], truncation=True, max_length=4)
        assert cut == (full[:4] if truncation_side == "right" else full[-4:])


def test_truncation_uses_model_max_length(tmp_path, backend):
    d = write_tokenizer_dir(tmp_path / "maxlen", backend, {**BLOOM_CONFIG, "model_max_length": 6})
    ours, ref = BloomTokenizerFast.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert ours.model_max_length == ref.model_max_length == 6
    for kw in (dict(truncation=True), dict(padding="max_length"), dict(padding="max_length", truncation=True)):
        assert _plain(ours(BATCH, **kw)) == _plain(ref(BATCH, **kw)), kw
    assert all(len(ids) == 6 for ids in ours(BATCH, truncation=True, padding="max_length")["input_ids"])
    # Without a model_max_length (BLOOM's config has none) truncation=True cuts nothing.
    assert ours.encode(TEXTS[2], truncation=True) != BloomTokenizerFast.from_pretrained(
        d, model_max_length=None
    ).encode(TEXTS[2], truncation=True)


def test_offsets_and_no_attention_mask(ours, ref):
    got = ours(BATCH, return_offsets_mapping=True)
    assert got["offset_mapping"] == ref(BATCH, return_offsets_mapping=True)["offset_mapping"]
    assert "attention_mask" not in ours(BATCH, return_attention_mask=False)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(ours, ref, skip):
    padded = ref(TEXTS, padding=True, return_tensors="pt")["input_ids"]  # pads and written-in specials
    for row in padded:
        assert ours.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip)
        ids = row.tolist()
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    batch = ours.batch_decode(padded, skip_special_tokens=skip)
    assert batch == ref.batch_decode(padded, skip_special_tokens=skip)
    assert ours.batch_decode(padded.numpy(), skip_special_tokens=skip) == batch
    assert ours.decode(padded, skip_special_tokens=skip) == batch
    ids = padded[0].tolist()
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == ref.convert_ids_to_tokens(
        ids, skip_special_tokens=skip
    )
    assert ours.decode(ids[-1]) == ref.decode(ids[-1])


def test_decode_round_trips_and_drops_pads(ours):
    for text in TEXTS:  # byte-level BPE is lossless
        assert ours.decode(ours.encode(text)) == text
    texts = [t for t in TEXTS if "<" not in t]  # (written-in special tokens are skipped too)
    batch = ours(texts, padding=True, return_tensors="pt")
    assert ours.batch_decode(batch.input_ids, skip_special_tokens=True) == texts
    decoded = ours.batch_decode(batch.input_ids)
    assert any(d.startswith("<pad>") for d in decoded)  # left padding kept without skip_special_tokens


def test_clean_up_tokenization_spaces(ours, tok_dir):
    # transformers 5 ignores the clean-up for BPE unless forced; BLOOM's transformers 4 class applied it.
    ref = transformers.AutoTokenizer.from_pretrained(
        str(tok_dir), clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True
    )
    text = "It's what we're doing , isn't it ? Yes . Hello !"
    ids = ours.encode(text)
    assert ours.clean_up_tokenization_spaces is False
    assert ours.decode(ids) == text
    cleaned = ours.decode(ids, clean_up_tokenization_spaces=True)
    assert cleaned == ref.decode(ids, clean_up_tokenization_spaces=True) != text
    assert cleaned == "It's what we're doing, isn't it? Yes. Hello!"
    assert ours.batch_decode([ids], clean_up_tokenization_spaces=True) == [cleaned]
    assert BloomTokenizerFast.from_pretrained(tok_dir, clean_up_tokenization_spaces=True).decode(ids) == cleaned


# ---------------------------------------------------------------- add_prefix_space


def _prefix_space_reference(tmp_path, backend):
    """transformers on a tokenizer.json whose ByteLevel pre-tokenizer was switched to add_prefix_space=true
    by editing the JSON (transformers 5 does not re-configure the pre-tokenizer itself)."""
    data = json.loads(backend.to_str())
    for part in data["pre_tokenizer"]["pretokenizers"]:
        if part["type"] == "ByteLevel":
            part["add_prefix_space"] = True
    d = tmp_path / "prefix_ref"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(BLOOM_CONFIG), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(str(d))


def test_add_prefix_space_matches_transformers(tmp_path, backend, tok_dir):
    ref = _prefix_space_reference(tmp_path, backend)
    ours = BloomTokenizerFast.from_pretrained(tok_dir, add_prefix_space=True)
    assert ours.add_prefix_space is True
    for text in TEXTS:
        assert _plain(ours(text)) == _plain(ref(text)), text
    kw = dict(padding=True, return_tensors="pt")
    assert _plain(ours(BATCH, **kw)) == _plain(ref(BATCH, **kw))
    # The point of the option: a leading word encodes like a word after a space.
    assert ours.encode("Hello world") == ours.encode(" Hello world")
    plain = BloomTokenizerFast.from_pretrained(tok_dir)
    assert plain.add_prefix_space is False and plain.encode("Hello world") != ours.encode("Hello world")
    # The setter switches back and forth.
    ours.add_prefix_space = False
    assert ours.encode("Hello world") == plain.encode("Hello world")
    plain.add_prefix_space = True
    assert plain.encode("Hello world") == ref.encode("Hello world")
    # A tokenizer.json that already prepends a space keeps doing so, whatever the config says (as transformers).
    ref_dir = tmp_path / "prefix_ref"
    (ref_dir / "tokenizer_config.json").write_text(json.dumps({**BLOOM_CONFIG, "add_prefix_space": False}))
    from_file = BloomTokenizerFast.from_pretrained(ref_dir)
    assert from_file.add_prefix_space is True and from_file.encode("Hello world") == ref.encode("Hello world")
    assert BloomTokenizerFast.from_pretrained(ref_dir, add_prefix_space=False).add_prefix_space is False


def test_add_prefix_space_does_not_touch_a_given_tokenizer_object(backend):
    before = backend.to_str()
    tok = BloomTokenizerFast(tokenizer_object=backend, add_prefix_space=True)
    assert tok.add_prefix_space and backend.to_str() == before


# ---------------------------------------------------------------- vocabulary and special tokens


def test_vocab_and_special_tokens_match_transformers(ours, ref):
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    assert ours.get_vocab() == ref.get_vocab()
    for name in ("unk", "bos", "eos", "pad"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token")
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id")
    assert (ours.unk_token_id, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (0, 1, 2, 3)
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids) == [0, 1, 2, 3]
    tokens = ["Hello", "Ġworld", "<pad>", "not-a-token-at-all"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("not-a-token-at-all") == ours.unk_token_id == 0
    assert ours.convert_ids_to_tokens(3) == "<pad>"
    assert ours.convert_tokens_to_string(ours.tokenize(TEXTS[3])) == TEXTS[3]


def test_setting_a_special_token(ours):
    ours.pad_token = ours.eos_token
    assert ours.pad_token_id == 2
    assert ours(BATCH, padding=True)["input_ids"][0][0] == 2
    ours.pad_token = "<new_pad>"  # not in the vocabulary: added as a special token
    assert ours.pad_token_id == len(ours) - 1
    assert ours.decode([ours.pad_token_id, ours.encode("Hello")[0]], skip_special_tokens=True) == "Hello"


def test_constructor_from_tokenizer_file(tok_dir):
    tok = BloomTokenizerFast(tokenizer_file=tok_dir / "tokenizer.json")
    assert tok.padding_side == "left" and tok.truncation_side == "right"
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == tuple(SPECIAL_TOKENS)
    assert tok.model_max_length == int(1e30) and tok.clean_up_tokenization_spaces is False
    assert tok.encode("Hello world") == BloomTokenizerFast.from_pretrained(tok_dir).encode("Hello world")


# ---------------------------------------------------------------- save_pretrained round trips


def test_save_pretrained_loads_in_transformers_and_ours(tmp_path, tok_dir):
    ours = BloomTokenizerFast.from_pretrained(
        tok_dir, padding_side="right", add_prefix_space=True, model_max_length=9
    )
    files = ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "BloomTokenizerFast"
    assert (config["padding_side"], config["add_prefix_space"], config["model_max_length"]) == ("right", True, 9)
    assert config["pad_token"] == "<pad>" and config["clean_up_tokenization_spaces"] is False
    saved_json = json.loads((tmp_path / "saved" / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved_json["padding"] is None and saved_json["truncation"] is None

    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    again = BloomTokenizerFast.from_pretrained(tmp_path / "saved")
    assert theirs.padding_side == again.padding_side == "right"
    assert theirs.model_max_length == again.model_max_length == 9
    assert again.add_prefix_space is True and theirs.pad_token_id == again.pad_token_id == 3
    for kw in (dict(), dict(padding=True, return_tensors="pt"), dict(truncation=True, padding="max_length")):
        want = _plain(ours(BATCH, **kw))
        assert _plain(theirs(BATCH, **kw)) == want, kw
        assert _plain(again(BATCH, **kw)) == want, kw


def test_transformers_save_loads_in_ours(tmp_path, ref):
    ref.save_pretrained(str(tmp_path / "theirs"))  # writes tokenizer_class "TokenizersBackend", no special map
    ours = BloomTokenizerFast.from_pretrained(tmp_path / "theirs")
    assert ours.padding_side == "left" and ours.pad_token_id == 3 and ours.eos_token == "</s>"
    for kw in (dict(), dict(padding=True, return_tensors="pt"), dict(truncation=True, max_length=4)):
        assert _plain(ours(TEXTS, **kw)) == _plain(ref(TEXTS, **kw)), kw
    ids = ref(TEXTS, padding=True)["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)


def test_pickle_and_deepcopy(ours):
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert _plain(clone(BATCH, padding=True)) == _plain(ours(BATCH, padding=True))
        assert clone.padding_side == ours.padding_side


# ---------------------------------------------------------------- BatchEncoding


def test_batch_encoding_access(ours):
    batch = ours(BATCH, padding=True, return_tensors="pt")
    assert isinstance(batch, BatchEncoding) and isinstance(batch, dict)
    assert batch.input_ids is batch["input_ids"] and set(batch) == {"input_ids", "attention_mask"}
    assert batch.to("cpu") is batch and batch.input_ids.device.type == "cpu"
    assert batch.tokens(0)[-1] == ours.convert_ids_to_tokens(batch.input_ids[0, -1].item())
    assert dict(**batch).keys() == {"input_ids", "attention_mask"}  # model(**batch)
    with pytest.raises(AttributeError, match="token_type_ids"):
        batch.token_type_ids
    if torch.cuda.is_available():
        assert batch.to("cuda").input_ids.is_cuda


# ---------------------------------------------------------------- errors


def test_missing_tokenizer_json_names_the_directory(tmp_path):
    empty = tmp_path / "no_tokenizer_here"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text(json.dumps(BLOOM_CONFIG), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as err:
        BloomTokenizerFast.from_pretrained(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError, match="tokenizer_file"):
        BloomTokenizerFast(tokenizer_file=empty / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer_file"):
        BloomTokenizerFast()
    with pytest.raises(ValueError, match="vocab_file/merges_file"):
        BloomTokenizerFast("vocab.json", "merges.txt")


def test_hub_id_not_cached_offline(tmp_path):
    # A hub id goes through bloom.hub with the loading arguments; nothing is cached in cache_dir and
    # local_files_only forbids the network, so the error says so (and nothing is downloaded).
    from bloom.hub import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="tokenizer.json of 'bigscience/bloom-560m'.*local_files_only"):
        BloomTokenizerFast.from_pretrained("bigscience/bloom-560m", local_files_only=True, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(padding="longestt"), r"padding must be one of False, True, 'longest', 'max_length'.*'longestt'"),
        (dict(padding=1), r"padding must be one of"),
        (dict(padding=True, padding_side="top"), r"padding_side must be 'left' or 'right', got 'top'"),
        (dict(truncation="middle"), r"truncation must be one of True, 'longest_first'.*'only_second'"),
        (dict(truncation=True, max_length=0), r"max_length must be a positive int"),
        (dict(return_tensors="tf"), r"return_tensors must be one of None, 'pt', 'np', got 'tf'"),
        (dict(padding=True, truncation=True, max_length=10, pad_to_multiple_of=4), r"not a multiple of"),
    ],
)
def test_bad_arguments_name_the_argument(ours, kw, match):
    with pytest.raises(ValueError, match=match):
        ours(BATCH, **kw)


def test_bad_sides_and_inputs(tok_dir, ours):
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        BloomTokenizerFast.from_pretrained(tok_dir, padding_side="middle")
    with pytest.raises(ValueError, match="truncation_side must be 'left' or 'right'"):
        BloomTokenizerFast.from_pretrained(tok_dir, truncation_side="both")
    with pytest.raises(TypeError, match="text must be a str, a list of str or a list of \(str, str\) pairs, got int"):
        ours(3)
    with pytest.raises(TypeError, match="containing int"):
        ours(["ok", 3])
    with pytest.raises(TypeError, match="add_prefix_space must be True or False"):
        ours.add_prefix_space = "yes"
    ours.padding_side = "up"  # a bad attribute is caught at the call, by name
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'up'"):
        ours(BATCH, padding=True)


def test_ragged_tensors_ask_for_padding(ours):
    with pytest.raises(ValueError, match=r"padding=True") as err:
        ours(BATCH, return_tensors="pt")
    assert "lengths" in str(err.value)
    ours(BATCH, return_tensors="pt", padding=True)  # the advice works


def test_padding_without_pad_token(tok_dir):
    tok = BloomTokenizerFast.from_pretrained(tok_dir, pad_token=None)
    assert tok.pad_token is None and tok.pad_token_id is None
    for padding in (True, "longest", "max_length"):
        with pytest.raises(ValueError, match=r"needs a padding token.*pad_token=None"):
            tok(BATCH, padding=padding, max_length=40)
    assert tok(BATCH)["input_ids"] == BloomTokenizerFast.from_pretrained(tok_dir)(BATCH)["input_ids"]


def test_add_prefix_space_needs_byte_level(tmp_path):
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "<unk>": 2}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="ByteLevel pre-tokenizer"):
        BloomTokenizerFast(tokenizer_object=tok, add_prefix_space=True)
    assert BloomTokenizerFast(tokenizer_object=tok, add_prefix_space=False).add_prefix_space is False


PAIRS_A = ["Hello world", "Une phrase un peu plus longue que l'autre", "x"]
PAIRS_B = ["and the second part", "b", "Ωμέγα y 日本語"]


@pytest.mark.parametrize("call", [
    dict(text=PAIRS_A[0], text_pair=PAIRS_B[0]),
    dict(text=PAIRS_A, text_pair=PAIRS_B, padding=True, return_tensors="pt"),
    dict(text=[list(p) for p in zip(PAIRS_A, PAIRS_B)], padding="longest"),
    dict(text=PAIRS_A, text_pair=PAIRS_B, truncation="longest_first", max_length=6, padding="max_length"),
    dict(text=PAIRS_A[0::2], text_pair=PAIRS_B[0::2], truncation="only_second", max_length=12),
    dict(text=PAIRS_A, text_pair=PAIRS_B, truncation="only_first", max_length=24),
    dict(text=PAIRS_A, text_pair=PAIRS_B, return_token_type_ids=True, return_special_tokens_mask=True),
    dict(text=PAIRS_A, return_special_tokens_mask=True, return_token_type_ids=True, padding=True),
    dict(text=PAIRS_A, text_target=PAIRS_B, padding=True, return_tensors="pt"),
    dict(text_target=PAIRS_B),
], ids=lambda c: ",".join(k for k in c if k != "text"))
def test_pairs_targets_and_extra_returns_match_transformers(ours, ref, call):
    assert _plain(ours(**call)) == _plain(ref(**call))


def test_pair_refusals_name_the_argument(ours):
    with pytest.raises(ValueError, match="text and text_pair must have the same length; got 3 and 2"):
        ours(PAIRS_A, PAIRS_B[:2])
    with pytest.raises(TypeError, match="text_pair must match text"):
        ours("a", ["b"])
    with pytest.raises(ValueError, match="give text .* or text_target"):
        ours()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kwargs", [dict(), dict(padding="max_length", max_length=40), dict(pad_to_multiple_of=8),
                                    dict(return_tensors="pt")], ids=str)
def test_pad_matches_transformers(ours, ref, side, kwargs):
    """Rows encoded one by one (a dataset), then padded together: a list of dicts and a dict of lists."""
    rows = [dict(ours(t, return_special_tokens_mask=True)) for t in PAIRS_A + PAIRS_B]
    for tok in (ours, ref):
        tok.padding_side = side
    assert _plain(ours.pad(rows, **kwargs)) == _plain(ref.pad(rows, **kwargs))
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    assert _plain(ours.pad(columns, **kwargs)) == _plain(ref.pad(columns, **kwargs))
    # rows without a mask: made and padded, or none with return_attention_mask=False (transformers leaves
    # a given mask unpadded then; ours pads what it is given)
    ids_only = [{"input_ids": row["input_ids"]} for row in rows]
    assert _plain(ours.pad(ids_only, **kwargs)) == _plain(ref.pad(ids_only, **kwargs))
    assert "attention_mask" not in ours.pad(ids_only, return_attention_mask=False)


def test_added_tokens_and_settable_special_ids_match_transformers(ours, ref):
    for tok in (ours, ref):
        assert tok.add_tokens(["<extra>", "brandnewword"]) == 2
        assert tok.add_tokens("<extra>") == 0
        assert tok.add_special_tokens({"additional_special_tokens": ["<ctx>"], "pad_token": "<padx>"}) == 2
        tok.eos_token_id = 5
    text = "a brandnewword <ctx> b<extra><padx>"
    assert _plain(ours(text)) == _plain(ref(text))
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    assert ours.eos_token == ref.eos_token and ours.pad_token_id == ref.pad_token_id
    assert set(ours.all_special_tokens) <= set(ref.all_special_tokens) and "<ctx>" in ours.all_special_tokens
    ids = ours(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.add_special_tokens({"additional_special_tokens": ["<more>"]},
                                   replace_additional_special_tokens=False) == 1
    assert ours.additional_special_tokens == ["<ctx>", "<more>"]
    with pytest.raises(ValueError, match="unknown keys \\['mask_token'\\]"):
        ours.add_special_tokens({"mask_token": "<m>"})
    with pytest.raises(ValueError, match="pad_token_id must be None or an id of the vocabulary"):
        ours.pad_token_id = 10**9


@pytest.mark.parametrize("call", [
    dict(text=PAIRS_A, truncation=True, max_length=6, stride=2, return_overflowing_tokens=True),
    dict(text=PAIRS_A[1], truncation=True, max_length=8, stride=3, return_overflowing_tokens=True),
    dict(text=PAIRS_A, truncation=True, max_length=7, stride=1, return_overflowing_tokens=True, padding=True,
         return_tensors="pt"),
    dict(text=PAIRS_A[0], truncation=True, max_length=8, return_overflowing_tokens=True),
], ids=lambda c: f"{type(c['text']).__name__}-{c['max_length']}-{c.get('stride', 0)}-{c.get('padding', False)}")
def test_overflowing_windows_match_transformers(ours, ref, call):
    assert _plain(ours(**call)) == _plain(ref(**call))


def test_keeping_additional_special_tokens_on_a_fresh_tokenizer(ours):
    """transformers 4.x's replace_additional_special_tokens=False (5.x dropped the argument)."""
    assert ours.add_special_tokens({"additional_special_tokens": ["<a1>"]},
                                   replace_additional_special_tokens=False) == 1
    assert ours.additional_special_tokens == ["<a1>"] and "<a1>" in ours.all_special_tokens
