#!/usr/bin/env python3
"""Container health check for StreamVG images (Docker HEALTHCHECK, Kubernetes exec probe).

With `STREAMVG_HEALTH_URL` set (the images set `http://127.0.0.1:9108/metrics`, the port
`--metrics-port 9108` serves), the process is healthy when that URL answers HTTP 200 within
`STREAMVG_HEALTH_TIMEOUT_S` seconds (default 3). With it empty (a `streamvg tail`
consumer serves no metrics), healthy means StreamVG imports, as `streamvg version` checks.
Exit status 0 = healthy, 1 = unhealthy, with one line saying why.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("STREAMVG_HEALTH_URL", "").strip()
    timeout_s = float(os.environ.get("STREAMVG_HEALTH_TIMEOUT_S", "3"))
    if not url:
        try:
            import streamvg
        except Exception as exc:
            print(f"unhealthy: streamvg does not import ({type(exc).__name__}: {exc})")
            return 1
        print(f"healthy: streamvg {streamvg.__version__} imports")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url} does not answer ({exc})")
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered HTTP {status}")
        return 1
    print(f"healthy: {url} answered HTTP 200")
    return 0


if __name__ == "__main__":
    sys.exit(main())
