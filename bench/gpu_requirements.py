"""What the GPU check kit's venv needs, read from pyproject.toml so it never drifts from it: the
service's dependencies with onnxruntime-gpu (the `gpu` extra) in place of onnxruntime (the two
provide the same module and must not be installed together), and httpx for the load clients.

    python3 -m bench.gpu_requirements        # one requirement a line, for pip download / install

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The bench's own needs beyond the service's, taken from the dev extra by name.
BENCH_ONLY = ("httpx",)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def kit_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    serving = [r for r in project["dependencies"] if _name(r) != "onnxruntime"]
    bench = [r for r in extras["dev"] if _name(r) in BENCH_ONLY]
    return [*serving, *extras["gpu"], *bench]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{r}\n" for r in kit_requirements()))
