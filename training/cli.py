"""Command line: ``python -m training <command> ...`` (thin layer over the library).

Commands:
  classifier     train, check and export a MobileNetV2 classifier
  detector       train, evaluate and export a MobileNetV2 SSDLite detector
  calibrate      re-estimate BN statistics (and temperature) from captured traffic,
                 gate, publish as the next version and move a version label
  promote        point a version label at a version
  rollback       move the stable label back to the previous stable version
  make-dataset   write the synthetic classification set as class folders
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from contract.tf_environment import prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()


def _add_classifier(sub: argparse._SubParsersAction) -> None:
    from training.classifier_config import PRESETS, ClassifierConfig, describe_presets

    p = sub.add_parser("classifier", help="train and export a MobileNetV2 classifier")
    defaults = ClassifierConfig()
    p.add_argument("--data", default="synthetic", help="class-folder directory, or 'synthetic'")
    p.add_argument("--model-base", default="models", help="model repository (default ./models)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named parameter set; flags override it; the summary names any export "
        f"gate it loosened. {describe_presets()}",
    )
    p.add_argument("--alpha", type=float, help=f"depth multiplier (default {defaults.alpha})")
    p.add_argument(
        "--image-size", type=int, help=f"input height = width (default {defaults.image_size})"
    )
    p.add_argument("--resize-method", choices=["bilinear", "bicubic", "area", "nearest", "lanczos"])
    p.add_argument("--geometry", choices=["stretch", "letterbox"])
    p.add_argument("--weights", help="none | imagenet | PATH to backbone weights (.weights.h5)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--head-epochs", type=int, help="frozen-backbone epochs (pretrained weights)")
    p.add_argument("--fine-tune-layers", type=int, help="top backbone layers to fine-tune (-1 all)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--fine-tune-learning-rate", type=float)
    p.add_argument("--schedule", choices=["cosine", "exponential"])
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    p.add_argument(
        "--augment",
        help="augmentations of training batches, a comma list of flip, rotate, zoom, "
        f"contrast, or none (default {defaults.augment}: no flip, which is wrong for "
        "digits, text and anything with handedness; natural photos: flip,rotate)",
    )
    p.add_argument(
        "--no-augment",
        dest="augment",
        action="store_const",
        const="none",
        help="same as --augment none",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        help=f"validation share, for early stopping (default {defaults.val_fraction})",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        help="test share: the card's held-out accuracy and the parity gate "
        f"(default {defaults.test_fraction})",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--synthetic-images", type=int)
    p.add_argument("--synthetic-imbalance", type=float, help="largest/smallest class ratio")
    p.add_argument("--bn-momentum", help="auto | keras | a number")
    p.add_argument("--no-precise-bn", dest="precise_bn", action="store_false", default=None)
    p.add_argument(
        "--max-parity-gap",
        type=float,
        help="tolerance of the parity gate (accuracy, 0..1): export is refused when "
        "inference mode is significantly (McNemar exact, 95%%) worse than training "
        "mode by more than this on the test split",
    )
    p.add_argument(
        "--force", action="store_true", default=None, help="export despite a failed parity check"
    )
    p.add_argument(
        "--label",
        dest="version_labels",
        action="append",
        help="version label(s) to point at the new version (default stable)",
    )
    p.set_defaults(func=_run_classifier)


def _config_from(args: argparse.Namespace, cls: type, presets: dict[str, dict]) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = (
        dict(presets.get(args.preset, {})) if getattr(args, "preset", None) else {}
    )
    for key, value in vars(args).items():
        if key in fields and value is not None:
            values[key] = tuple(value) if key == "version_labels" else value
    return cls(**values)


def _run_classifier(args: argparse.Namespace) -> int:
    from contract.export import ExportRefused
    from training.classifier import PRESETS, ClassifierConfig, train_classifier

    try:
        cfg = _config_from(args, ClassifierConfig, PRESETS)
    except ValueError as exc:  # a bad flag value: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = train_classifier(cfg)
    except ExportRefused as exc:
        if exc.summary:  # the figures of the refused run: what the gate judged
            _print_summary(exc.summary)
        print(f"error: {exc}", file=sys.stderr)
        return 3
    _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    shown = {k: v for k, v in summary.items() if k != "model"}
    print("\n== summary ==")
    print(
        f"held-out accuracy (inference mode): {summary['accuracy']:.4f} "
        f"(test split, {summary.get('test_images', '?')} images)"
    )
    if "validation_accuracy" in summary:
        print(
            f"validation accuracy: {summary['validation_accuracy']:.4f} "
            f"(validation split, {summary['val_images']} images; it chose the restored epoch)"
        )
    p = summary["parity"]
    print(
        f"parity (test split): inference {p['inference_mode']:.4f} vs training mode "
        f"{p['training_mode']:.4f}, gap {100 * p['gap']:.2f} points "
        f"({100 * p['confidence']:.0f}% interval {100 * p['interval'][0]:.2f} to "
        f"{100 * p['interval'][1]:.2f}; tolerance {100 * p['threshold']:.1f}, "
        f"p = {p['p_value']:.2g} on {p['images']} images: {p['decision']})"
    )
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")
    print("per-class accuracy:")
    for cls, acc in summary["per_class_accuracy"].items():
        n = summary["class_counts"].get(cls, 0)
        w = summary["class_weights"].get(cls, 0.0)
        print(f"  {cls:>12}: {acc if acc is None else f'{acc:.4f}'}  (train n={n}, weight {w:.2f})")
    if summary.get("skipped_files"):
        print(f"skipped {len(summary['skipped_files'])} undecodable files:")
        for key, why in summary["skipped_files"][:20]:
            print(f"  {key}: {why}")
    print(f"training time: {summary['train_seconds']} s, epochs run: {summary['epochs_run']}")
    if "exported" in summary:
        print(f"exported: {summary['exported']} (version {summary['version']})")
    print(json.dumps(shown, default=str, sort_keys=True))


def _add_detector(sub: argparse._SubParsersAction) -> None:
    from training.detection.cli import add_detector_arguments, run_detector

    p = sub.add_parser("detector", help="train and export a MobileNetV2 SSDLite detector")
    add_detector_arguments(p)
    p.set_defaults(func=lambda a: 0 if run_detector(a) is not None else 1)


def _add_calibration(sub: argparse._SubParsersAction) -> None:
    # The one permitted import of calibration from training: its commands live there.
    from calibration.cli import add_subcommands

    add_subcommands(sub)


def _add_make_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-dataset", help="write the synthetic set as class folders of PNG/JPEG")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imbalance", type=float, default=1.0)
    p.add_argument(
        "--background", default=None, help="domain: solid|gradient|noise|checker|stripes"
    )
    p.add_argument("--format", choices=["png", "jpeg"], default="png")
    p.set_defaults(func=_run_make_dataset)


def _run_make_dataset(args: argparse.Namespace) -> int:
    from PIL import Image

    from training import synthetic

    images, labels = synthetic.generate(
        args.images, seed=args.seed, imbalance=args.imbalance, background=args.background
    )
    ext = "png" if args.format == "png" else "jpg"
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = args.out / synthetic.CLASSES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.{ext}", quality=92)
    print(f"wrote {len(images)} images to {args.out}")
    return 0


def add_train_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add the training runs, ``classifier`` and ``detector``, to a command line's subparsers.

    Each sets ``func`` to the function that runs it and returns the exit code.
    """
    _add_classifier(sub)
    _add_detector(sub)


def build_parser(prog: str = "python -m training") -> argparse.ArgumentParser:
    """The whole command line; ``prog`` is the name its usage and ``--help`` show."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_subcommands(sub)
    _add_calibration(sub)
    _add_make_dataset(sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m training") -> int:
    """Run one command; its exit code."""
    args = build_parser(prog).parse_args(argv)
    return int(args.func(args) or 0)


def console_main() -> int:
    """The ``imgserve-train`` console script: the same command line under its own name."""
    return main(prog="imgserve-train")
