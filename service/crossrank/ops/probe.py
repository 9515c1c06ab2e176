"""Container health probe: ``python -m crossrank.ops.probe [PATH]`` exits 0 when the server in this
container answers 200 on PATH (default ``/ready``), else 1 with the reason on stderr.

The standard library only, so that a Dockerfile ``HEALTHCHECK`` needs no curl or wget in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def probe(path: str, port: int) -> str | None:
    """None when ``GET http://127.0.0.1:PORT/PATH`` answers 200, else why not."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code} {exc.read(200).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "/ready"
    # The port the server listens on: the same variable `crossrank serve` reads.
    reason = probe(path, int(os.environ.get("CROSSRANK_PORT", "8080")))
    if reason is not None:
        print(f"crossrank probe: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
