"""Download a model repository from the Hugging Face Hub, never waiting forever.

huggingface_hub (2.x) sends its metadata calls (`repo_info`, the file listing) with no timeout:
an endpoint that accepts the connection and never answers holds them for good. `download` runs
`snapshot_download` in a daemon thread and watches the repository's cache folder: when nothing
has arrived there after HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT seconds (the larger;
huggingface_hub's own settings, 10 s by default) it gives up with one line naming the host
(HF_ENDPOINT). Once files arrive, the file downloads run under huggingface_hub's own read
timeouts (HF_HUB_DOWNLOAD_TIMEOUT per read) and may take as long as they need.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from weavelm.errors import WeavelmError

POLL_S = 0.25


def hub_host() -> str:
    """host[:port] of the Hub endpoint in use (HF_ENDPOINT, else huggingface.co)."""
    from huggingface_hub import constants
    return urlparse(constants.ENDPOINT).netloc or constants.ENDPOINT


def _bytes_under(folder: Path) -> int:
    total = 0
    try:
        for f in folder.rglob("*"):
            try:
                total += f.stat().st_size
            except OSError:
                pass
    except OSError:
        pass
    return total


def _explain(error: BaseException, repo_id: str, host: str) -> WeavelmError:
    """One line for what snapshot_download raised."""
    name = type(error).__name__
    causes = [error]
    while causes[-1].__cause__ is not None or causes[-1].__context__ is not None:
        nxt = causes[-1].__cause__ or causes[-1].__context__
        if nxt in causes:
            break
        causes.append(nxt)
    names = " ".join(type(c).__name__ for c in causes)
    if "RepositoryNotFound" in names or "GatedRepo" in names:
        return WeavelmError(f"{repo_id!r} was not found on the Hugging Face Hub at {host} (or "
                            f"needs a login): check the name, or `hf auth login` for a gated "
                            f"model")
    if "Timeout" in names:
        return WeavelmError(f"the Hugging Face Hub at {host} did not answer in time while "
                            f"fetching {repo_id!r} ({name}): check your network or HF_ENDPOINT, "
                            f"or pass a local model path")
    if "Connect" in names or "Network" in names or "Offline" in names:
        return WeavelmError(f"could not reach the Hugging Face Hub at {host} to fetch "
                            f"{repo_id!r} ({name}): check your network or HF_ENDPOINT, or pass "
                            f"a local model path")
    return WeavelmError(f"could not download {repo_id!r} from the Hugging Face Hub at {host} "
                        f"({name}): check the name, your network, or pass a local path")


def download(repo_id: str, patterns: list[str]) -> Path:
    """`snapshot_download(repo_id, allow_patterns=patterns)`, bounded while nothing arrives."""
    from huggingface_hub import constants, snapshot_download
    limit = float(max(constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT))
    host = hub_host()
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    result: dict = {}

    def fetch():
        try:
            result["path"] = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except BaseException as e:                   # noqa: BLE001 - explained by the caller
            result["error"] = e

    worker = threading.Thread(target=fetch, name="weavelm-hub-download", daemon=True)
    worker.start()
    start, began = _bytes_under(folder), time.monotonic()
    while worker.is_alive():
        worker.join(POLL_S)
        if _bytes_under(folder) != start:
            worker.join()       # files arrive: huggingface_hub's own read timeouts apply now
        elif worker.is_alive() and time.monotonic() - began > limit:
            # A complete snapshot already in the cache needs no bytes: use it rather than fail
            # on a slow metadata call. The thread stays blocked on its socket; as a daemon it
            # does not hold the exit.
            try:
                return Path(snapshot_download(repo_id, allow_patterns=patterns,
                                              local_files_only=True))
            except Exception:                        # noqa: BLE001 - not (all) cached
                pass
            raise WeavelmError(f"the Hugging Face Hub at {host} did not answer for {limit:g} s "
                               f"while fetching {repo_id!r}: check your network or HF_ENDPOINT, "
                               f"raise HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT, or pass "
                               f"a local model path")
    if "error" in result:
        raise _explain(result["error"], repo_id, host) from None
    return result["path"]
