"""The ``imgserve`` command line (also ``python -m imgserve``).

Servers:
  serve       the REST gateway under gunicorn
  grpc        the gRPC gateway (imgserve.v1.ImageService)
Models:
  train       train and export a classifier or a detector
  calibrate   re-estimate BN statistics on captured traffic, gate, publish
  promote     point a version label at a version
  rollback    move the stable label back to the previous stable version
Clients of a running gateway:
  classify    classify image files
  detect      detect objects in image files, optionally drawing them
  feedback    send the true labels or boxes of a captured request

Run ``imgserve COMMAND --help`` for a command's flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROG = "imgserve"


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help and the function that adds its flags (and ``func``)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: More for the command's own ``--help`` (exit codes), after ``help``.
    more: str = ""


def _serve(parser: argparse.ArgumentParser) -> None:
    from imgserve.servers import add_serve_arguments

    add_serve_arguments(parser)


def _grpc(parser: argparse.ArgumentParser) -> None:
    from imgserve.servers import add_grpc_arguments

    add_grpc_arguments(parser)


def _train(parser: argparse.ArgumentParser) -> None:
    from training.cli import add_train_subcommands

    add_train_subcommands(parser.add_subparsers(dest="task", required=True, metavar="TASK"))


def _calibration(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        from calibration import cli

        add_arguments, run = {
            "calibrate": (cli.add_calibrate_arguments, cli.run_calibrate),
            "promote": (cli.add_promote_arguments, cli.run_promote),
            "rollback": (cli.add_rollback_arguments, cli.run_rollback),
        }[name]
        add_arguments(parser)
        parser.set_defaults(func=run)

    return add


def _classify(parser: argparse.ArgumentParser) -> None:
    from imgserve.predict import add_classify_arguments

    add_classify_arguments(parser)


def _detect(parser: argparse.ArgumentParser) -> None:
    from imgserve.predict import add_detect_arguments

    add_detect_arguments(parser)


def _feedback(parser: argparse.ArgumentParser) -> None:
    from imgserve.feedback import add_feedback_arguments

    add_feedback_arguments(parser)


CLIENT_EXITS = (
    "Exit codes: 0 answered, 1 the server refused the request (4xx: a bad image or "
    "option), 2 usage error, 3 the server failed or is overloaded (5xx, 429), "
    "4 no server answered."
)
COMMANDS: dict[str, Command] = {
    "serve": Command("run the REST gateway under gunicorn", _serve),
    "grpc": Command("run the gRPC gateway", _grpc),
    "train": Command("train and export a classifier or a detector", _train),
    "calibrate": Command(
        "calibrate a model on captured traffic and publish the next version",
        _calibration("calibrate"),
        "Exit codes: 0 published, 3 rejected by the gate, 4 too few samples, 5 error.",
    ),
    "promote": Command("point a version label at a version", _calibration("promote")),
    "rollback": Command(
        "move the stable label back to the previous stable version", _calibration("rollback")
    ),
    "classify": Command("classify image files with a running gateway", _classify, CLIENT_EXITS),
    "detect": Command(
        "detect objects in image files with a running gateway, optionally drawing them",
        _detect,
        CLIENT_EXITS,
    ),
    "feedback": Command(
        "send the true labels or boxes of a captured request, for calibration",
        _feedback,
        CLIENT_EXITS.replace("0 answered", "0 recorded").replace(
            "4xx: a bad image or option",
            "4xx: an unknown request id, a label the model lacks, other feedback recorded first",
        ),
    ),
}


def requested_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, with the flags of ``command`` only.

    Every subcommand is listed, but only the one being run adds its flags: those of
    ``train`` and ``calibrate`` import TensorFlow, which a client call or ``--help``
    should not wait for.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, serve, calibrate and call the imgserve image-inference service.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        description = f"{spec.help[0].upper()}{spec.help[1:]}. {spec.more}".strip()
        p = sub.add_parser(name, help=spec.help, description=description)
        if name == command:
            spec.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``imgserve`` command; its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(requested_command(argv)).parse_args(argv)
    return int(args.func(args) or 0)
