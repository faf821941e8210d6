"""Find a model's files: in a local directory, or fetched (one file at a time) from the Hugging Face hub.

Only the files asked for are downloaded — never a whole repository snapshot. The hub arguments every
`from_pretrained` takes (revision, cache_dir, local_files_only, token) travel as one `HubOptions`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any


class ModelNotFoundError(OSError):
    """The name is neither a local directory nor a reachable hub repository."""


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


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).is_dir()


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    hub: HubOptions = HubOptions(),
    *,
    required: bool = True,
) -> Path | None:
    """Path of `filename` in a local directory or a hub repo; None if absent and not `required`."""
    if is_local(name_or_path):
        path = Path(name_or_path) / (hub.subfolder or "") / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{filename} not found in the directory {name_or_path}")
        return None

    name = str(name_or_path)
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or "\\" in name:
        # Looks like a filesystem path, not an 'org/name' hub id.
        raise ModelNotFoundError(f"{name!r} is not a directory (and does not look like a hub id)")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id=name, filename=filename, **hub.to_kwargs()))
    except LocalEntryNotFoundError:
        # Offline (or local_files_only) and the file is not in the cache. When the file is optional
        # we cannot tell "absent from the repo" from "not cached": treat it as absent.
        if not required:
            return None
        raise ModelNotFoundError(
            f"{filename} of {name!r} is not in the local cache and the hub cannot be reached "
            "(offline or local_files_only=True); pass a local directory or go online once"
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
