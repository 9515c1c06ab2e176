"""The model directory contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from crossrank.model.model_dir import METADATA_FILE, ModelDir, ModelDirError, load_model_dir


def copy(model_dir: ModelDir, tmp_path: Path) -> Path:
    out = tmp_path / "m"
    shutil.copytree(model_dir.path, out)
    return out


def edit_metadata(path: Path, **changes) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    meta.update(changes)
    (path / METADATA_FILE).write_text(json.dumps(meta))


def test_variant_choice(model_dir: ModelDir, tmp_path: Path) -> None:
    path = copy(model_dir, tmp_path)
    shutil.copy(path / "model.onnx", path / "model_int8.onnx")
    shutil.copy(path / "model.onnx", path / "model_fp16.onnx")
    edit_metadata(
        path,
        variants={"fp32": "model.onnx", "int8": "model_int8.onnx", "fp16": "model_fp16.onnx"},
    )
    model = load_model_dir(path)
    assert model.choose_variant("auto", "cpu") == "int8"
    assert model.choose_variant("auto", "cuda") == "fp16"
    assert model.choose_variant("fp32", "cuda") == "fp32"
    with pytest.raises(ModelDirError, match="no variant 'bf16'"):
        model.choose_variant("bf16", "cpu")
    assert load_model_dir(model_dir.path).choose_variant("auto", "cpu") == "fp32"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda p: (p / METADATA_FILE).unlink(), "crossrank.json is missing"),
        (lambda p: (p / "tokenizer.json").unlink(), "no tokenizer.json"),
        (lambda p: (p / "model.onnx").unlink(), "does not exist"),
        (lambda p: (p / METADATA_FILE).write_text("{"), "invalid"),
        (lambda p: edit_metadata(p, format_version=99), "format_version"),
        (lambda p: edit_metadata(p, max_query_tokens=200, max_length=128), "max_query_tokens"),
        (lambda p: edit_metadata(p, variants={}), "variants"),
    ],
)
def test_broken_directories_are_explained(
    model_dir: ModelDir, tmp_path: Path, breakage, message: str
) -> None:
    path = copy(model_dir, tmp_path)
    breakage(path)
    with pytest.raises(ModelDirError, match=message):
        load_model_dir(path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
