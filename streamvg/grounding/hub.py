"""A hub id that cannot be had: one sentence in a few seconds, not a minute of retries.

`transformers` retries an unreachable hub for tens of seconds (46 s measured) before
failing, and then suggests a tool the installed hub no longer ships. `check_hub_model(id)`
answers first: the id is in the local cache (fine), or the hub is off (`HF_HUB_OFFLINE`) or
does not answer a TCP connect within `connect_timeout_s` — then `ModelLoadError` saying to
`hf download` it or to give a local folder.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from streamvg.errors import ModelLoadError

__all__ = ["check_hub_model"]


def check_hub_model(model_id: str, *, connect_timeout_s: float = 3.0) -> None:
    """Raise `ModelLoadError` when hub id `model_id` is neither cached nor downloadable now."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # an id the hub library rejects: let from_pretrained say why
        return
    if isinstance(cached, str):
        return
    fix = f"download it first with `hf download {model_id}` on a machine with internet access, or give a local model directory"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False") or bool(constants.HF_HUB_OFFLINE)
    if offline:
        raise ModelLoadError(f"model {model_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fix}",
                             model=model_id)
    endpoint = urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=connect_timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ModelLoadError(f"model {model_id} is not in the local Hugging Face cache and the hub ({host}) cannot be "
                             f"reached ({reason}); {fix}", model=model_id) from exc
