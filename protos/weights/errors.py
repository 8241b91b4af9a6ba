"""One-line errors for everything that can go wrong getting weights from the Hub."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class WeightsError(ValueError):
    """A one-line reason (CLIs print it as `moe-swarm: error: ...`); a ValueError so they already do."""


def changed_under_commit(repo: str, commit: str, name: str, why: str) -> WeightsError:
    return WeightsError(
        f"{repo}@{commit[:12]}: {name} changed under a pinned commit ({why}); refusing to mix its bytes "
        "with the cached ones (remove the cache folder to start over)"
    )


@contextlib.contextmanager
def hub_errors(repo: str, revision: str, endpoint: str, transport: bool = True) -> Iterator[None]:
    """Turn huggingface_hub's and the HTTP client's exceptions into one line each (the client's
    transport errors only when `transport`: a caller that retries them handles them itself)."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        raise WeightsError(
            f"{repo} is a gated repo: accept its conditions on the Hub, then set HF_TOKEN "
            "(or run `hf auth login`) with a token that has access"
        ) from None
    except errors.RevisionNotFoundError:
        raise WeightsError(f"{repo} has no revision {revision!r} (give a branch, tag or commit)") from None
    except errors.RepositoryNotFoundError:
        raise WeightsError(
            f"no local folder {repo!r} and no model repo of that name at {endpoint} "
            "(a private repo needs HF_TOKEN with access to it)"
        ) from None
    except errors.RemoteEntryNotFoundError as e:
        raise WeightsError(f"{repo}@{revision}: a file is missing on the Hub: {_first_line(e)}") from None
    except errors.OfflineModeIsEnabled:
        raise WeightsError(
            f"HF_HUB_OFFLINE is set and the cache lacks what {repo}@{revision} needs here: "
            "unset it to download, or run once online"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise WeightsError(f"cannot reach {endpoint} for {repo}, and the cache lacks what is needed") from None
    except errors.HFValidationError as e:
        raise WeightsError(f"{repo!r} is not a Hub repo id: {_first_line(e)}") from None
    except errors.HfHubHTTPError as e:
        raise WeightsError(f"{repo}: the Hub answered {_first_line(e)}") from None
    except httpx2.TransportError as e:
        if not transport:
            raise
        raise WeightsError(f"cannot reach {endpoint} for {repo}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((line for line in text.splitlines() if line.strip()), type(e).__name__)
