"""Tuning results kept on disk, for the GPU tuners (triton/_tuning.py) and the CPU routes (cpu_routes.py)
alike: the cache folder, the one-line note printed the first time a key is timed, atomic JSON files
that a corrupt or unwritable file never turns into an error. No triton import: the CPU routes run on
installs without it. See triton/_tuning.py for the environment variables and why the note is a print.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

QUIET_ENV = "BLOOM_KERNELS_TUNE_QUIET"
CACHE_DIR_ENV = "BLOOM_KERNELS_CACHE_DIR"

# (what, key) of every key this process has timed, in order, printed or not: `python -m
# bloom_kernels.tune` reads it to report what each call tuned.
tuning_events: list[tuple[str, str]] = []
_noted: set[tuple[str, str, str]] = set()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _short(path) -> str:
    """A path for humans: the home folder as ~."""
    text, home = str(path), os.path.expanduser("~")
    return "~" + text[len(home):] if home not in ("", "/") and (text + "/").startswith(home + "/") else text


def tune_cache_dir() -> Path:
    """The folder of bloom_kernels' own tuning results: $BLOOM_KERNELS_CACHE_DIR, else
    $XDG_CACHE_HOME/bloom_kernels, else ~/.cache/bloom_kernels (read on every call)."""
    explicit = os.environ.get(CACHE_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bloom_kernels"


def short_hash(text: str) -> str:
    """12 hex digits of sha256(text): a compact stand-in for a long key part (a candidate list)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def note_tuning(what: str, key: str, gpu: str, cache: str) -> bool:
    """Print one line to stderr the first time this process times `key` of `what` on `gpu` (results
    cached in `cache`); nothing with BLOOM_KERNELS_TUNE_QUIET=1. Returns whether this was the first."""
    if (what, key, gpu) in _noted:
        return False
    _noted.add((what, key, gpu))
    tuning_events.append((what, key))
    if not _flag(QUIET_ENV):
        print(f"bloom_kernels: tuning {what} for {key} on {gpu} (once; cached in {_short(cache)})",
              file=sys.stderr, flush=True)
    return True


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_json(path) -> dict:
    """The JSON object in `path`; {} if there is no file. An unreadable or corrupt file (not JSON, not
    an object) is ignored with a RuntimeWarning, never an error: tuning results are only a cache."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # not written yet (or cannot be: save_json says so)
        return {}
    except OSError as err:
        _warn_once(f"bloom_kernels: ignoring the tuning cache {path}: cannot read it ({err})")
        return {}
    try:
        data = json.loads(text)
    except ValueError as err:
        _warn_once(f"bloom_kernels: ignoring the tuning cache {path}: not valid JSON ({err}); it will be "
                   "rewritten")
        return {}
    if not isinstance(data, dict):
        _warn_once(f"bloom_kernels: ignoring the tuning cache {path}: expected a JSON object, found "
                   f"{type(data).__name__}; it will be rewritten")
        return {}
    return data


def save_json(path, data: dict) -> bool:
    """Write `data` to `path` atomically (a temporary file in the same folder, then os.replace), so a
    reader never sees half a file. An unwritable folder warns and returns False: tuning goes on."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _warn_once(f"bloom_kernels: cannot write the tuning cache {path} ({err}); results stay in memory")
        return False


class TuningCache:
    """{key: JSON value} in one file under tune_cache_dir(): read once, lazily (again if the folder
    changes); `put` merges into what is on disk now (another process may have added keys) and
    rewrites the file atomically."""

    def __init__(self, filename: str):
        self.filename = filename
        self._entries: dict | None = None
        self._loaded_from: Path | None = None

    @property
    def path(self) -> Path:
        return tune_cache_dir() / self.filename

    def _load(self) -> dict:
        path = self.path
        if self._entries is None or self._loaded_from != path:
            self._entries, self._loaded_from = load_json(path), path
        return self._entries

    def reload(self) -> None:
        """Read the file again on the next get (another process may have changed it)."""
        self._entries = None

    def get(self, key: str):
        return self._load().get(key)

    def put(self, key: str, value) -> None:
        merged = {**self._load(), **load_json(self.path), key: value}
        self._entries = merged
        save_json(self.path, merged)


@functools.cache
def tuning_cache(name: str) -> TuningCache:
    """The process-wide TuningCache of one tuner, in the file <name>.json."""
    return TuningCache(f"{name}.json")
