"""`bloom init DIR`: a random-weight checkpoint + tokenizer that the other commands load offline."""

import pytest
import torch
from safetensors.torch import load_file

import bloom.cli
from bloom import BloomForCausalLM, BloomTokenizerFast
from bloom.shapes import SHAPES


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("init") / "tiny"
    assert bloom.cli.main(["init", str(directory), "--shape", "tiny"]) == 0
    return directory


def test_init_writes_a_checkpoint_and_says_what_to_run_next(tmp_path, capsys):
    assert bloom.cli.main(["init", str(tmp_path / "ckpt"), "--shape", "tiny", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in out and (tmp_path / "ckpt" / name).is_file()
    assert f"bloom generate {tmp_path / 'ckpt'}" in out


def test_the_checkpoint_loads_with_from_pretrained(tiny_dir):
    model = BloomForCausalLM.from_pretrained(tiny_dir)
    tokenizer = BloomTokenizerFast.from_pretrained(tiny_dir)
    hidden, layers, heads, _ = SHAPES["tiny"]
    c = model.config
    assert (c.hidden_size, c.n_layer, c.n_head) == (hidden, layers, heads)
    # every id the model can pick names a token (decode refuses others), and the special tokens agree
    vocab = len(tokenizer)
    assert c.vocab_size == vocab
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 3)
    assert tokenizer.padding_side == "left"
    ids = tokenizer(["Hello world", "Bonjour 你好 🙂"], padding=True, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][1], skip_special_tokens=True) == "Bonjour 你好 🙂"
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == vocab and torch.isfinite(logits).all()


def test_generate_runs_on_the_checkpoint(tiny_dir, capsys):
    assert bloom.cli.main(["generate", str(tiny_dir), "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_a_non_empty_directory_is_refused_unless_forced(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert bloom.cli.main(["init", str(tmp_path), "--shape", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bloom: error: DIR") and "not empty" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "config.json").exists()

    assert bloom.cli.main(["init", str(tmp_path), "--shape", "tiny", "--force"]) == 0
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --force overwrites only its own files


def test_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert bloom.cli.main(["init", str(tmp_path / "file")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_the_same_seed_writes_the_same_weights(tmp_path, tiny_dir):
    assert bloom.cli.main(["init", str(tmp_path / "again"), "--shape", "tiny"]) == 0
    assert bloom.cli.main(["init", str(tmp_path / "other"), "--shape", "tiny", "--seed", "1"]) == 0
    first, again, other = (load_file(str(d / "model.safetensors")) for d in (tiny_dir, tmp_path / "again",
                                                                              tmp_path / "other"))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.word_embeddings.weight"], other["transformer.word_embeddings.weight"])


def test_dtype_is_saved(tmp_path):
    assert bloom.cli.main(["init", str(tmp_path), "--shape", "tiny", "--dtype", "bf16"]) == 0
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.bfloat16


def test_the_subcommand_is_documented():
    help_text = bloom.cli.build_parser()._subparsers._group_actions[0].choices["init"].format_help()
    assert "random-weight" in help_text and "--shape" in help_text and "--force" in help_text


def test_a_checkpoint_that_would_not_fit_on_the_disk_is_refused_up_front(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    assert bloom.cli.main(["init", str(tmp_path / "big"), "--shape", "bloom-560m"]) == 1
    err = capsys.readouterr().err
    # the message names the size needed and the way out; nothing was written
    assert "GB" in err and "--shape" in err and not (tmp_path / "big").exists()
