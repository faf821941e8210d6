"""The README's first steps and Python snippets run as written on a CPU-only machine (issue 15).

The `bloom ...` lines of the "First steps" section run through the CLI's main (in a temporary working
directory, so `./tiny-bloom` lands there); then every ```python block of the README runs, in order, in
one namespace (the snippets build on each other, as a reader running them in turn would), and every
```python torchrun block as a script under `torchrun --nproc-per-node 2` (gloo). The hub is switched
off: a snippet that needed the network would fail here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # one snippet shows the transformers interop

from bloom import cli  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(info: str, text: str) -> list[str]:
    """The code of the fenced blocks whose info string is exactly `info`."""
    return re.findall(rf"^```{info}\n(.*?)^```", text, flags=re.S | re.M)


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

    for i, code in enumerate(_blocks("python torchrun", text)):
        script = tmp_path / f"readme_torchrun_{i + 1}.py"
        script.write_text(code, encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BLOOM_KERNELS_CPU_ROUTE": "default"}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              "2", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=180)
        assert run.returncode == 0, f"README torchrun block {i + 1} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        assert "The capital of France is" in run.stdout  # rank 0 printed the generated text
        assert (tmp_path / "tiny-bloom-copy" / "model.safetensors").is_file()
