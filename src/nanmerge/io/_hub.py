"""Hugging Face Hub repo ids (`org/name@revision`) as inputs, resolved through the local cache.

huggingface_hub is imported only when a repo id is actually resolved, so merges of local
files never load it. The cache is tried first; a download happens only when the caller
allows it and offline mode (HF_HUB_OFFLINE) is off.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nanmerge._types import MergeError

from ._checkpoint import NON_WEIGHT_FILES

# Hub names: letters, digits, '-', '_', '.'; no leading or trailing '-' or '.', at most 96.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"({_NAME})/({_NAME})(?:@([A-Za-z0-9._/-]+))?")
# A string ending like a weight file names a (missing) local file, never a repo.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")
_TRUE = {"1", "on", "yes", "true"}

# What a download fetches: safetensors weights with their index (and LoRA adapter files),
# or, only for repos without them, PyTorch weights; plus config and tokenizer files.
SAFETENSORS_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "adapter_model.safetensors")
PYTORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "adapter_model.bin")
SAFETENSORS_PATTERNS = (
    *SAFETENSORS_WEIGHTS,
    "model.safetensors.index.json",
    "adapter_config.json",
    *NON_WEIGHT_FILES,
)
PYTORCH_PATTERNS = (*PYTORCH_WEIGHTS, "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class HubRepo:
    """A model repository on the Hugging Face Hub, at a revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"

    def fetch_command(self) -> str:
        revision = "" if self.revision is None else f" --revision {self.revision}"
        return f"hf download {self.repo_id}{revision}"


def parse_repo_id(text: str) -> HubRepo | None:
    """The repo a string names when it has the shape `org/name[@revision]`, else None.

    Shape only: the caller decides whether an existing local path of that name wins.
    """
    match = _REPO_ID.fullmatch(text)
    if match is None:
        return None
    org, name, revision = match.groups()
    if any(".." in part or "--" in part for part in (org, name)):
        return None
    if name.lower().endswith(_FILE_SUFFIXES):
        return None
    return HubRepo(f"{org}/{name}", revision)


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolves_inside(path: Path, roots: Iterable[Path]) -> bool:
    """Whether `path` lies in one of `roots`, comparing real paths (every link followed):
    `a/../../x` and a link out of the folder both leave it, a link to a linked cache does not.
    """
    real = path.resolve()
    return any(real.is_relative_to(root.resolve()) for root in roots)


def stays_in_source(path: Path, folder: Path) -> bool:
    """Whether `path` resolves inside `folder`, or inside the hub cache when `folder` is a
    snapshot there (a snapshot's files are links into the repo's ../../blobs/).

    The cache is looked up only for a path that leaves its folder, so local merges never
    import huggingface_hub for it; without huggingface_hub there is no cache to trust.
    """
    if resolves_inside(path, [folder]):
        return True
    try:
        cache = hub_cache_dir()
    except ImportError:
        return False
    return resolves_inside(folder, [cache]) and resolves_inside(path, [cache])


def hub_offline() -> bool:
    """Whether the user switched the Hub off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _has_weights(folder: Path, patterns: tuple[str, ...]) -> bool:
    return any(any(folder.glob(pattern)) for pattern in patterns)


def _not_cached(repo: HubRepo, cache: Path, allow_downloads: bool) -> MergeError:
    revision = "" if repo.revision is None else f" at revision '{repo.revision}'"
    if allow_downloads:
        remedy = (
            "downloads are allowed but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; unset "
            f"it, or fetch the model with `{repo.fetch_command()}`"
        )
    else:
        remedy = (
            f"fetch it with `{repo.fetch_command()}` (`huggingface-cli download` in older "
            "huggingface_hub), or pass --allow-downloads (recipe: `allow_downloads: true`) to let "
            "nanmerge download it"
        )
    return MergeError(
        f"Hugging Face repo '{repo.repo_id}'{revision} is not in the local cache {cache} "
        f"(and no local path '{repo}' exists); {remedy}"
    )


def _download(repo: HubRepo, cache: Path) -> Path:
    """Download the weights (safetensors, else PyTorch files) and config/tokenizer files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        folder = Path(
            snapshot_download(
                repo.repo_id,
                revision=repo.revision,
                cache_dir=cache,
                allow_patterns=list(SAFETENSORS_PATTERNS),
            )
        )
        if not _has_weights(folder, SAFETENSORS_WEIGHTS):
            folder = Path(
                snapshot_download(
                    repo.repo_id,
                    revision=repo.revision,
                    cache_dir=cache,
                    allow_patterns=list(PYTORCH_PATTERNS),
                )
            )
    except RevisionNotFoundError:
        raise MergeError(
            f"Hugging Face repo '{repo.repo_id}' has no revision '{repo.revision}'; check the "
            "branch, tag or commit after '@'"
        ) from None
    except RepositoryNotFoundError:
        raise MergeError(
            f"Hugging Face repo '{repo.repo_id}' was not found on the Hub, or it is private or "
            "gated: check the name, and log in with `hf auth login` if you have access"
        ) from None
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeError(
            f"could not download Hugging Face repo '{repo}' into {cache} ({reason}); check the "
            f"network, or fetch it with `{repo.fetch_command()}`"
        ) from None
    return folder


def hub_snapshot(repo: HubRepo, *, allow_downloads: bool = False) -> Path:
    """The snapshot folder of `repo` in the hub cache, downloaded first only when allowed.

    Offline or not allowed, a repo missing from the cache is a MergeError that names it and
    says how to fetch it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    download = allow_downloads and not hub_offline()
    try:
        return Path(
            snapshot_download(
                repo.repo_id,
                revision=repo.revision,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=[*SAFETENSORS_PATTERNS, *PYTORCH_PATTERNS],
            )
        )
    except IncompleteSnapshotError as exc:
        # Usually only the weight format we do not need is missing (e.g. the .bin beside the
        # .safetensors): use what is there unless it has no weights and downloading may help.
        partial = Path(exc.snapshot_path)
        if not download or _has_weights(partial, SAFETENSORS_WEIGHTS + PYTORCH_WEIGHTS):
            return partial
    except LocalEntryNotFoundError:
        if not download:
            raise _not_cached(repo, cache, allow_downloads) from None
    return _download(repo, cache)


def model_folder(source: str, *, allow_downloads: bool = False) -> Path:
    """A local folder, or the cached snapshot of the repo id `source` names."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    repo = None if path.exists() else parse_repo_id(source)
    if repo is None:
        raise MergeError(
            f"{source} is not a folder (nor a Hugging Face repo id of the form ORG/NAME[@REV])"
        )
    return hub_snapshot(repo, allow_downloads=allow_downloads)
