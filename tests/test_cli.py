"""The `bloom` command line, end to end on a tiny checkpoint + tokenizer written in a temp dir."""

import os
import subprocess
import sys

import pytest
import torch

from bloom import BloomConfig, BloomForCausalLM, BloomTokenizerFast
from bloom.cli import build_parser, main
from helpers import BLOOM_CONFIG, train_bloom_like_tokenizer, write_tokenizer_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bloom")
    backend = train_bloom_like_tokenizer()
    write_tokenizer_dir(path, backend, BLOOM_CONFIG)
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, n_layer=2, n_head=4,
                         pad_token_id=3, eos_token_id=2)
    model = BloomForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def expected_text(model_dir, prompt, **kwargs):
    tokenizer = BloomTokenizerFast.from_pretrained(model_dir)
    model = BloomForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return tokenizer.decode(model.generate(ids, **kwargs)[0], skip_special_tokens=True) + "\n"


def test_greedy_generation_streams_the_text(model_dir, capsys):
    assert main(["generate", str(model_dir), "Hello world", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out == expected_text(model_dir, "Hello world", max_new_tokens=8)
    assert out.startswith("Hello world")


def test_beam_search_and_no_repeat_ngrams_print_the_best_sequence(model_dir, capsys):
    args = ["generate", str(model_dir), "Hello world", "--max-new-tokens", "6", "--num-beams", "3",
            "--no-repeat-ngram-size", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out == expected_text(model_dir, "Hello world", max_new_tokens=6, num_beams=3, no_repeat_ngram_size=2)


def test_sampling_with_a_seed_is_reproducible(model_dir, capsys):
    args = ["generate", str(model_dir), "Bonjour", "--max-new-tokens", "10", "--temperature", "1.3",
            "--top-k", "50", "--top-p", "0.95", "--seed", "11", "--dtype", "fp32", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    gen = torch.Generator().manual_seed(11)
    assert first == expected_text(model_dir, "Bonjour", max_new_tokens=10, do_sample=True, temperature=1.3,
                                  top_k=50, top_p=0.95, generator=gen)


def test_console_script_runs_in_a_real_process(model_dir):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "bloom.cli", "generate", str(model_dir), "你好",
                           "--max-new-tokens", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_text(model_dir, "你好", max_new_tokens=5)


@pytest.mark.parametrize("args, words", [
    (["generate", "/no/such/dir/model", "hi"], ["not a directory"]),
    (["generate", "MODEL_DIR", "hi", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["generate", "MODEL_DIR", "hi", "--temperature", "0"], ["temperature"]),
    (["generate", "MODEL_DIR", "hi", "--device", "cuda:7"], ["CUDA"] if not torch.cuda.is_available() else []),
])
def test_errors_print_one_clear_line_and_exit_non_zero(model_dir, capsys, args, words):
    if not words:
        pytest.skip("this machine has CUDA")
    args = [str(model_dir) if a == "MODEL_DIR" else a for a in args]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("bloom: error: ") and captured.err.count("\n") == 1
    for word in words:
        assert word in captured.err


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "m", "p", "--dtype", "fp8"])
    assert info.value.code == 2
    assert "--dtype" in capsys.readouterr().err


def test_help_documents_every_option():
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for option in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--device",
                   "--dtype", "--int8", "--num-beams", "--no-repeat-ngram-size", "MODEL", "PROMPT"):
        assert option in text


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bloom {version('bloom-kernels')}"


@pytest.mark.parametrize("device, says", [
    ("gpu0", "'gpu0' is not a device: expected cpu, cuda or cuda:N"),
    ("cuda:x", "is not a device"),
    ("mps", "bloom runs on cpu or cuda devices"),
    ("cuda:7", "CUDA is not available" if not torch.cuda.is_available() else "CUDA device(s)"),
])
def test_an_unknown_device_is_one_line(model_dir, capsys, device, says):
    assert main(["generate", str(model_dir), "Hello", "--device", device]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bloom: error: --device") and says in err


def test_top_k_zero_means_no_top_k_limit(model_dir, capsys):
    """--top-k 0 is transformers' "no top-k filter" (documented in --help): sampling over every token."""
    args = ["generate", str(model_dir), "Bonjour", "--max-new-tokens", "6", "--top-k", "0", "--seed", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out == expected_text(model_dir, "Bonjour", max_new_tokens=6, do_sample=True, top_k=None,
                                generator=torch.Generator().manual_seed(3))
    assert "0 = no top-k limit" in " ".join(build_parser()._subparsers._group_actions[0]
                                            .choices["generate"].format_help().split())
