"""Find a model's files: in a local directory, or fetched (one file at a time) from the Hugging Face hub.

Only the files asked for are downloaded — never a whole repository snapshot. The hub arguments every
`from_pretrained` takes (revision, cache_dir, local_files_only, token) travel as one `HubOptions`.

A name is a local path when it can only be one (see `looks_local`): then it must be a directory, and the
hub is never asked. Otherwise it is a hub id ('org/name').

An unreachable hub fails fast. huggingface_hub's `hf_hub_download`, when its first metadata request gets no
answer and the file is not cached, retries with a 60 s timeout and exponential backoff (5 retries, ~24 s of
sleeps, a logged warning each) — minutes when the network swallows packets. So before downloading we ask
the hub once, with a short timeout and no retries (`_unreachable_reason`); if it does not answer, only the
hub cache is used, as `hf_hub_download` itself would after its retries, and a missing file is a
`HubUnreachableError` naming the way out.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ModelNotFoundError(OSError):
    """The name is neither a local directory nor a reachable hub repository."""


class LocalDirectoryNotFoundError(ModelNotFoundError):
    """The name is a local path (see `looks_local`) but no directory is there; the hub is not asked.

    Not a FileNotFoundError: that one means "a file is missing from the model's directory or repository".
    """


class HubUnreachableError(ModelNotFoundError):
    """The hub does not answer and the file asked for is not in the hub cache."""


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """How to fetch files from the hub; the fields are `hf_hub_download`'s arguments of the same names.

    Ignored for a local directory.
    """

    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    token: str | bool | None = None
    subfolder: str | None = None  # the model's files are in this folder of the directory / repository

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "HubOptions":
        """Pop the hub options out of `kwargs` (in place; missing ones keep their defaults)."""
        return cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for huggingface_hub calls (and for the public from_pretrained methods)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# --------------------------------------------------------------------------------------------------
# Local paths
# --------------------------------------------------------------------------------------------------
def _expand(name_or_path: str | os.PathLike) -> Path:
    return Path(name_or_path).expanduser()


def is_local(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` is an existing directory (`~` expanded)."""
    return _expand(name_or_path).is_dir()


def _shaped_like_hub_id(name: str) -> bool:
    """'org/name' or 'name': no leading '.', '/' or '~', no backslash, at most one '/'."""
    return not name.startswith((".", "/", "~")) and "\\" not in name and name.count("/") <= 1


def _existing_first_component(name: str) -> str | None:
    """The first component of 'a/b' when it exists on disk (so 'a/b' means a path, not a hub id)."""
    first, slash, _ = name.partition("/")
    return first if slash and first and Path(first).exists() else None


def looks_local(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` can only be a filesystem path, never a hub id ('org/name' or 'name').

    A path object; a name starting with '.', '/' or '~'; one with a backslash or more than one '/'; or one
    whose first component exists on disk ('models/bloom' where ./models exists).
    """
    if not isinstance(name_or_path, str):  # a pathlib.Path (any os.PathLike) is meant as a path
        return True
    return not _shaped_like_hub_id(name_or_path) or _existing_first_component(name_or_path) is not None


def _missing_directory_error(name_or_path: str | os.PathLike, path: Path) -> LocalDirectoryNotFoundError:
    given = str(name_or_path)
    shown = f"{given} (= {path})" if given.startswith("~") else given  # where '~' led
    if path.exists():
        why = "it is a file, and a model path must be the directory of the model's files"
    elif (isinstance(name_or_path, str) and _shaped_like_hub_id(name_or_path)
          and (first := _existing_first_component(name_or_path))):
        why = (f"the model path is not a directory; it is read as a local path, not a hub id, because "
               f"./{first} exists")
    else:
        why = "the model path is not a directory; a local path is never looked up on the hub"
    return LocalDirectoryNotFoundError(f"no such directory: {shown} ({why})")


def _local_directory(name_or_path: str | os.PathLike) -> Path | None:
    """The directory `name_or_path` names, or None for a hub id; a local path that is not a directory
    raises LocalDirectoryNotFoundError."""
    path = _expand(name_or_path)
    if path.is_dir():
        return path
    if looks_local(name_or_path):
        raise _missing_directory_error(name_or_path, path)
    return None


def _resolve_local_file(directory: Path, filename: str, hub: HubOptions, required: bool) -> Path | None:
    path = directory / (hub.subfolder or "") / filename
    if path.is_file():
        return path
    if required:
        raise FileNotFoundError(f"{filename} not found in the directory {directory}")
    return None


# --------------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------------
# How long the reachability check waits (per phase: connect, then answer) unless the user set
# HF_HUB_ETAG_TIMEOUT: long enough for a slow link (TLS to huggingface.co takes ~3 round trips), short
# enough that an unreachable hub fails in about 2 s.
PROBE_TIMEOUT_S = 1.5
# One check per hub host serves the several files of one from_pretrained (and the next few loads).
_REACHABILITY_TTL_S = 30.0
_reachability: dict[str, tuple[float, str | None]] = {}  # hub origin -> (time.monotonic(), reason or None)


def _probe_timeout() -> float:
    from huggingface_hub import constants

    # A user who set HF_HUB_ETAG_TIMEOUT chose how long to wait for the hub's metadata: that wins (the
    # value huggingface_hub read from it).
    if os.environ.get("HF_HUB_ETAG_TIMEOUT"):
        return float(constants.HF_HUB_ETAG_TIMEOUT)
    return PROBE_TIMEOUT_S


@functools.cache
def _no_answer_errors() -> tuple[type[BaseException], ...]:
    """The exceptions meaning "the server did not answer" (refused, unresolvable, timed out, proxy down)
    in the HTTP library of the installed huggingface_hub: httpx2 (2.x), httpx (1.x) or requests (0.x)."""
    importlib.import_module("huggingface_hub.file_download")  # loads the HTTP library it uses
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        lib = sys.modules.get(module)  # only a library already loaded can be the one in use
        errors += [getattr(lib, name) for name in names if hasattr(lib, name)]
    return tuple(errors)


def _short_reason(err: BaseException, host: str, timeout: float) -> str:
    """One short line on why `host` did not answer, e.g. 'huggingface.co: connection refused'."""
    if "Timeout" in type(err).__name__:
        what = f"no answer within {timeout:g} s; HF_HUB_ETAG_TIMEOUT sets this wait"
    else:
        text = " ".join(str(err).split())
        # "[Errno 111] Connection refused", also when wrapped in a longer message (requests)
        errnos = re.findall(r"\[Errno -?\d+\] ([^'\"()\]]+)", text)
        what = (errnos[-1].strip() if errnos else text or type(err).__name__)[:100].lower()
    return f"{host}: {what}"


def _probe(origin: str, timeout: float) -> str | None:
    """Why the hub at `origin` does not answer one request (no retries), or None if it answers.

    Through huggingface_hub's shared session (the user's proxies, certificates, client factory), but not
    through its metadata calls: those first build the User-Agent, which fetches an agent registry from the
    hub with its own 3 s timeout (huggingface_hub 2.x) — longer than the whole check may take.
    """
    from huggingface_hub.utils import get_session

    try:
        get_session().head(origin + "/", timeout=timeout)
    except _no_answer_errors() as err:
        return _short_reason(err, urlsplit(origin).netloc, timeout)
    except Exception:
        # An answer of some kind, or a bad argument: hf_hub_download reports it.
        return None
    return None


def _unreachable_reason(name: str, filename: str, hub: HubOptions) -> str | None:
    """Why the hub serving `name` cannot be reached (checked at most once per `_REACHABILITY_TTL_S` per hub
    host), or None if it can."""
    from huggingface_hub import hf_hub_url

    parts = urlsplit(hf_hub_url(name, filename, subfolder=hub.subfolder, revision=hub.revision))
    origin = f"{parts.scheme}://{parts.netloc}"  # the host hf_hub_download would ask
    known = _reachability.get(origin)
    if known is not None and time.monotonic() - known[0] < _REACHABILITY_TTL_S:
        return known[1]
    reason = _probe(origin, _probe_timeout())
    _reachability[origin] = (time.monotonic(), reason)
    return reason


def _should_check_reachability(hub: HubOptions, download: Any) -> bool:
    import huggingface_hub.file_download
    from huggingface_hub import constants

    if hub.local_files_only or constants.is_offline_mode():
        return False  # no hub requests anyway: hf_hub_download answers from the cache
    # Only huggingface_hub's own hf_hub_download retries as described above; a replacement (a wrapper
    # fetching from elsewhere, a test double) is called as is.
    return download is huggingface_hub.file_download.hf_hub_download


def _cached_file(name: str, filename: str, hub: HubOptions) -> Path | None:
    """`filename` of `name` from the hub cache, found as hf_hub_download finds it when the hub does not
    answer (the revision's ref, then its snapshot), but without any request — hf_hub_download, even with
    local_files_only, builds the User-Agent (see `_probe`)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(
        name, f"{hub.subfolder}/{filename}" if hub.subfolder else filename, revision=hub.revision,
        cache_dir=None if hub.cache_dir is None else Path(hub.cache_dir).expanduser(),
    )
    return Path(path) if isinstance(path, str) else None  # not a str: not cached, or cached as absent


def _from_cache_only(name: str, filename: str, hub: HubOptions, required: bool, reason: str) -> Path | None:
    path = _cached_file(name, filename, hub)
    # An optional file not in the cache counts as absent, as it does offline.
    if path is not None or not required:
        return path
    raise HubUnreachableError(
        f"cannot reach the Hugging Face hub to fetch {filename} of {name!r} ({reason}): pass a local "
        "directory, or set HF_HUB_OFFLINE=1 to use the files already in the hub cache"
    )


def _resolve_hub_file(name: str, filename: str, hub: HubOptions, required: bool) -> Path | None:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _should_check_reachability(hub, hf_hub_download):
        reason = _unreachable_reason(name, filename, hub)
        if reason is not None:
            return _from_cache_only(name, filename, hub, required, reason)
    try:
        return Path(hf_hub_download(repo_id=name, filename=filename, **hub.to_kwargs()))
    except LocalEntryNotFoundError as err:
        # The hub did not serve the file (offline, local_files_only, or its answer failed) and it is not in
        # the cache. When the file is optional we cannot tell "absent from the repo" from "not cached":
        # treat it as absent.
        if not required:
            return None
        if hub.local_files_only or constants.is_offline_mode():
            raise ModelNotFoundError(
                f"{filename} of {name!r} is not in the local cache and the hub cannot be reached "
                "(offline or local_files_only=True); pass a local directory or go online once"
            ) from None
        # e.g. HF_ENDPOINT answers but is not a hub, or the hub failed after hf_hub_download's retries
        cause = err.__cause__ or err  # hf_hub_download chains the hub's answer to a generic message
        raise ModelNotFoundError(
            f"{filename} of {name!r} is not in the local cache and the hub did not serve it "
            f"({' '.join(str(cause).split())[:300]})"
        ) from None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"{filename} not found in the hub repository {name}") from None
        return None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{name!r} is not a local directory and not a hub repository you can access"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision {hub.revision!r} not found in the hub repository {name}") from None


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    hub: HubOptions = HubOptions(),
    *,
    required: bool = True,
) -> Path | None:
    """Path of `filename` in a local directory or a hub repo; None if absent and not `required`.

    Raises LocalDirectoryNotFoundError for a local path that is not a directory, HubUnreachableError when
    the hub does not answer and the file is not cached (both ModelNotFoundError, an OSError)."""
    directory = _local_directory(name_or_path)
    if directory is not None:
        return _resolve_local_file(directory, filename, hub, required)
    return _resolve_hub_file(str(name_or_path), filename, hub, required)
