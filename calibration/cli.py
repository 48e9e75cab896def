"""The ``calibrate``, ``promote`` and ``rollback`` commands of ``python -m training``.

``calibrate`` parses its flags into a :class:`CalibrationConfig` and runs
:func:`calibration.dispatch.calibrate`. Exit codes, for people and scripts
running it by hand: 0 published, 3 rejected by the gate, 4 too few samples,
5 error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from types import MappingProxyType

from calibration.config import FINE_TUNE_DEFAULTS, PROMOTE_LABELS, CalibrationConfig
from calibration.dispatch import calibrate
from calibration.errors import CalibrationError, LabelError, NotEnoughSamplesError
from calibration.labels import promote, rollback
from calibration.result import FAILED, INSUFFICIENT_SAMPLES, PUBLISHED, REJECTED
from contract.repository import RepositoryError

EXIT_PUBLISHED = 0
EXIT_REJECTED = 3
EXIT_NOT_ENOUGH_SAMPLES = 4
EXIT_ERROR = 5
#: The exit code of each outcome (jobs record it beside the outcome).
EXIT_CODES = MappingProxyType(
    {
        PUBLISHED: EXIT_PUBLISHED,
        REJECTED: EXIT_REJECTED,
        INSUFFICIENT_SAMPLES: EXIT_NOT_ENOUGH_SAMPLES,
        FAILED: EXIT_ERROR,
    }
)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``calibrate``, ``promote`` and ``rollback`` to a command line's subparsers."""
    for name, help_, add, run in [
        (
            "calibrate",
            "calibrate a model on captured traffic and publish the next version",
            add_calibrate_arguments,
            run_calibrate,
        ),
        ("promote", "point a version label at a version", add_promote_arguments, run_promote),
        (
            "rollback",
            "move the stable label back to the previous stable version",
            add_rollback_arguments,
            run_rollback,
        ),
    ]:
        p = sub.add_parser(name, help=help_)
        add(p)
        p.set_defaults(func=run)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m training calibrate``; each sets the config field of its name."""
    c = CalibrationConfig  # its defaults are the command line's
    parser.add_argument(
        "--model-base", default=c.model_base, help="model repository (default ./models)"
    )
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument(
        "--samples", dest="samples_dir", required=True, help="capture store root (holds <name>/)"
    )
    parser.add_argument(
        "--prior-strength",
        type=_prior_arg,
        default=c.prior_strength,
        help="source statistics as N pseudo-images (0: the samples alone); 'auto' (default) "
        "picks the best on labelled feedback that keeps the reference set within tolerance "
        "(a detector fine-tuned on box feedback: the best on the reference set)",
    )
    parser.add_argument(
        "--min-samples", type=int, default=c.min_samples, help="fewest images to calibrate on"
    )
    parser.add_argument(
        "--min-labelled",
        type=int,
        default=c.min_labelled,
        help="fewest labelled images to fit a temperature and judge on traffic",
    )
    parser.add_argument(
        "--max-samples", type=int, default=c.max_samples, help="newest images used at most"
    )
    parser.add_argument(
        "--accuracy-tolerance",
        type=float,
        default=c.accuracy_tolerance,
        help="largest accuracy drop the gate accepts (0..1)",
    )
    parser.add_argument(
        "--max-class-share",
        type=float,
        default=c.max_class_share,
        help="largest share of one class in the samples",
    )
    parser.add_argument(
        "--promote",
        choices=PROMOTE_LABELS,
        default=c.promote,
        help="label to point at a published candidate (default canary)",
    )
    parser.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=c.fine_tune_epochs,
        help="epochs of fine-tuning on labelled feedback from drifted traffic (0: off; "
        f"default by task: {_task_defaults(0)})",
    )
    parser.add_argument(
        "--fine-tune-learning-rate",
        type=float,
        default=c.fine_tune_learning_rate,
        help=f"Adam learning rate of fine-tuning (default by task: {_task_defaults(1)})",
    )
    parser.add_argument(
        "--fine-tune-weight-mix",
        type=float,
        default=c.fine_tune_weight_mix,
        help="detectors: share of the fine-tuned change kept in the candidate's weights "
        "(parent + mix x (fine-tuned - parent); 1: the fine-tuned weights)",
    )
    parser.add_argument(
        "--min-fine-tune-labels",
        type=int,
        default=c.min_fine_tune_labels,
        help="fewest labelled fit samples to fine-tune on",
    )
    parser.add_argument("--seed", type=int, default=c.seed)


def _task_defaults(which: int) -> str:
    return ", ".join(f"{task} {v[which]:g}" for task, v in FINE_TUNE_DEFAULTS.items())


def _prior_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        strength = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 or 'auto', got {value!r}"
        ) from None
    if strength < 0:
        raise argparse.ArgumentTypeError("the prior strength must be >= 0")
    return strength


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    """The config the parsed ``calibrate`` flags ask for (fields without a flag: defaults)."""
    fields = {f.name for f in dataclasses.fields(CalibrationConfig)}
    return CalibrationConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run_calibrate(args: argparse.Namespace) -> int:
    """Run a calibration; exit 0 published, 3 rejected by the gate, 4 too few samples, 5 error."""
    try:
        result = calibrate(config_from_args(args))
    except NotEnoughSamplesError as exc:
        print(f"not enough samples: {exc}", file=sys.stderr)
        return EXIT_NOT_ENOUGH_SAMPLES
    except (CalibrationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(result.to_dict(), indent=1, default=float))
    if result.passed:
        print(
            f"published {result.name} version {result.version} ({result.labels_moved})",
            file=sys.stderr,
        )
        return EXIT_PUBLISHED
    print(f"rejected: candidate kept at {result.path}", file=sys.stderr)
    for reason in result.reasons:
        print(f"  - {reason}", file=sys.stderr)
    return EXIT_REJECTED


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m training promote``."""
    parser.add_argument(
        "--model-base", default="models", help="model repository (default ./models)"
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", type=int, required=True, help="published version to label")
    parser.add_argument("--label", default="stable", help="version label to move (default stable)")


def run_promote(args: argparse.Namespace) -> int:
    """Move a label; exit 0, or 5 when the version or label cannot be used."""
    try:
        previous = promote(args.model_base, args.name, args.version, args.label)
    except (LabelError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(
        json.dumps(
            {"name": args.name, "label": args.label, "version": args.version, "previous": previous}
        )
    )
    return 0


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m training rollback``."""
    parser.add_argument(
        "--model-base", default="models", help="model repository (default ./models)"
    )
    parser.add_argument("--name", required=True)
    parser.add_argument(
        "--label", default="stable", help="version label to move back (default stable)"
    )


def run_rollback(args: argparse.Namespace) -> int:
    """Move a label back to its previous version; exit 0, or 5 when there is none."""
    try:
        current, target = rollback(args.model_base, args.name, args.label)
    except (LabelError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps({"name": args.name, "label": args.label, "from": current, "to": target}))
    return 0
