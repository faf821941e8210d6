"""The README's first steps and Python snippets run as written on a CPU-only machine (issue 15).

The `bloom ...` lines of the "First steps" section run through the CLI's main (in a temporary working
directory, so `./tiny-bloom` lands there); then every ```python block of the README runs, in order, in
one namespace (the snippets build on each other, as a reader running them in turn would). The hub is
switched off: a snippet that needed the network would fail here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # one snippet shows the transformers interop

from bloom import cli  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str, text: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _commands(bash: str) -> list[list[str]]:
    """The `bloom ...` command lines of a bash block, comments dropped."""
    lines = [line.split("  #")[0].strip() for line in bash.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("bloom ")]


def test_first_steps_then_every_python_snippet(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commands = [c for block in _blocks("bash", _section(text, "First steps")) for c in _commands(block)]
    assert [c[0] for c in commands] == ["parity", "bench", "init", "generate"]
    for argv in commands:
        if argv[0] == "bench":  # the README's command with the repeats cut: the test checks it runs
            argv = argv + ["--repeats", "1", "--no-progress"]
        assert cli.main(argv) == 0, f"bloom {shlex.join(argv)} failed: {capsys.readouterr().err}"
    assert (tmp_path / "tiny-bloom" / "model.safetensors").is_file()

    snippets = _blocks("python", text)
    assert len(snippets) >= 6
    namespace: dict = {}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"README python block {i + 1} failed: {type(err).__name__}: {err}\n{code}")
    assert namespace["report"].passed
