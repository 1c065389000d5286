"""Is the Hugging Face hub reachable? Asked once per process, so that hub names fail at once when it is not.

Without network, ``transformers`` and ``datasets`` retry a download for half a minute to a minute before they
fail; model names (``models.check_hub``) and dataset names (``data.io``) ask here first instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, asked once per process with one request (no retries); False at
    once under ``HF_HUB_OFFLINE``. Without it, a download with no network retries for about a minute."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_REACHABLE:
        try:
            get_session().head(endpoint, timeout=timeout)
            _HUB_REACHABLE[endpoint] = True  # any answer, even an error status, means the network is there
        except Exception:
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


def hub_offline() -> str:
    """Why a hub dataset cannot be downloaded now ("HF_HUB_OFFLINE is set", "<endpoint> cannot be reached"),
    or "" when it can."""
    import datasets
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set"
    return "" if hub_reachable() else f"{constants.ENDPOINT} cannot be reached"


@contextlib.contextmanager
def offline_mode(on: bool) -> Iterator[None]:
    """Inside, ``datasets`` and ``huggingface_hub`` use only the local cache (when ``on``): no retries."""
    if not on:
        yield
        return
    import datasets
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before
