"""The ``crossrank`` command. ``serve`` needs no torch; the training commands import it lazily."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

import onnxruntime as ort
from pydantic import ValidationError

from crossrank.core.service import ModelConfigError, catalog
from crossrank.model.engine import EngineConfigError, plan_session
from crossrank.ops.settings import Settings

TRAINING_COMMANDS = ("train", "interpolate", "eval", "export", "mine", "teach", "calibrate")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, so the CLI never drifts from the settings."""
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        help_text = info.description or ""
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, action="append", help=help_text)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(annotation), help=help_text)
        else:
            kind = annotation if annotation in (int, float, str, Path) else str
            parser.add_argument(flag, type=kind, help=help_text)


def _serve(args: argparse.Namespace) -> int:
    given = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        print(f"crossrank serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    # Fail before uvicorn starts, with the reason, rather than as an aborted app start-up.
    try:
        for entry in catalog(settings):
            plan_session(entry.settings.device, ort.get_available_providers())
    except (ModelConfigError, EngineConfigError) as exc:
        print(f"crossrank serve: {exc}", file=sys.stderr)
        return 2
    from crossrank.http.server import serve

    serve(settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINING_COMMANDS:
        try:
            from crossrank_train.cli import main as train_main
        except ImportError as exc:
            print(
                f"crossrank {argv[0]} needs the training extra: pip install 'crossrank[train]' "
                f"({exc})",
                file=sys.stderr,
            )
            return 2
        return train_main(argv)
    parser = argparse.ArgumentParser(prog="crossrank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="Serve a model directory over HTTP (flags override CROSSRANK_* variables)."
    )
    _add_settings_flags(serve)
    for name in TRAINING_COMMANDS:
        commands.add_parser(name, help="(training package) see `crossrank NAME --help`")
    args = parser.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
