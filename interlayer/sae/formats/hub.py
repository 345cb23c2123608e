"""``hf://owner/repo[@revision]/path/in/repo``: an SAE on the Hugging Face hub, fetched with
``huggingface_hub.snapshot_download`` and then read by the same readers as a local folder.

Only the SAE files of the known formats (:data:`SAE_FILES`) at that path and in its subfolders are fetched,
never a whole repository (Gemma Scope's hold hundreds of GB): a path inside the repository is required. They
are cached as huggingface_hub caches everything, so the second load is offline. A revision cannot contain
``/`` (write a branch, tag or commit hash).
"""

from __future__ import annotations

from pathlib import Path

from interlayer.errors import UserError

PREFIX = "hf://"
SAE_FILES = (
    "cfg.json",
    "sae.safetensors",
    "sae_weights.safetensors",
    "activation_scaler.json",
    "params.npz",
    "ae.pt",
    "config.json",
)
"""The files of every format :func:`interlayer.sae.load_sae` reads."""


def is_hub_path(path: str | Path) -> bool:
    """Whether ``path`` is an ``hf://`` path."""
    return str(path).startswith(PREFIX)


def parse_hub_path(path: str) -> tuple[str, str | None, str]:
    """(repo id, revision or None, path inside the repo) of ``hf://owner/repo[@rev]/sub/path``."""
    parts = path[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise UserError(f"{path!r} is not a hub path; write hf://owner/repo[@revision]/path/in/repo")
    repo, _, revision = parts[1].partition("@")
    inner = "/".join(parts[2:])
    if not inner:
        raise UserError(
            f"{path!r} names a whole repository; add the SAE's folder inside it (hf://owner/repo/path), so that "
            "only that SAE is downloaded"
        )
    if ".." in parts[2:] or "" in parts[2:]:
        raise UserError(f"{path!r}: the path inside the repository may not contain '..' or empty parts")
    return f"{parts[0]}/{repo}", revision or None, inner


def download(path: str) -> Path:
    """The local folder holding the files of hub path ``path`` (downloaded or taken from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id, revision, inner = parse_hub_path(path)
    patterns = [f"{inner}/{name}" for name in SAE_FILES] + [f"{inner}/*/{name}" for name in SAE_FILES]
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (
        RepositoryNotFoundError,
        LocalEntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        OSError,
    ) as exc:
        raise UserError(
            f"could not fetch {path} from the Hugging Face hub: {type(exc).__name__}: {exc}"
        ) from None
    local = root / inner
    if not local.exists():
        raise UserError(f"{path}: the repository {repo_id} has nothing at {inner!r}")
    return local
