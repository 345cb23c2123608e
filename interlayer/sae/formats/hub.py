"""``hf://owner/repo[@revision]/path/in/repo``: an SAE on the Hugging Face hub, fetched with
``huggingface_hub.snapshot_download`` (only the files under that path; cached as huggingface_hub caches
everything, so the second load is offline) and then read by the same readers as a local folder."""

from __future__ import annotations

from pathlib import Path

from interlayer.errors import UserError

PREFIX = "hf://"


def is_hub_path(path: str | Path) -> bool:
    return str(path).startswith(PREFIX)


def parse_hub_path(path: str) -> tuple[str, str | None, str]:
    """(repo id, revision or None, path inside the repo) of ``hf://owner/repo[@rev]/sub/path``."""
    parts = path[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise UserError(f"{path!r} is not a hub path; write hf://owner/repo[@revision]/path/in/repo")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", revision or None, "/".join(parts[2:])


def download(path: str) -> Path:
    """The local folder holding the files of hub path ``path`` (downloaded or taken from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, revision, inner = parse_hub_path(path)
    patterns = [f"{inner}/*", inner] if inner else None
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise UserError(
            f"could not fetch {path} from the Hugging Face hub: {type(exc).__name__}: {exc}"
        ) from None
    local = root / inner
    if not local.exists():
        raise UserError(f"{path}: the repository {repo_id} has nothing at {inner!r}")
    return local
