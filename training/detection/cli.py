"""The ``detector`` command of ``python -m training``: flags, the summary it prints, the run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from contract.export import ExportRefused
from training.detection.config import PRESETS, DetectorTrainConfig
from training.detection.data import DatasetError
from training.detection.train import train_detector


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def add_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``detector`` command's flags (each maps to a :class:`DetectorTrainConfig` field)."""
    d = DetectorTrainConfig()
    p = parser
    p.add_argument("--data", default="synthetic", help="COCO annotation JSON, or 'synthetic'")
    p.add_argument("--images", help="image folder of --data (default: 'images' beside the JSON)")
    p.add_argument(
        "--val-data",
        help="held-out COCO JSON, split into validation and test (default: fractions of --data)",
    )
    p.add_argument("--val-images", help="image folder of --val-data")
    p.add_argument(
        "--val-fraction",
        type=float,
        help=f"validation share, for early stopping (default {d.val_fraction})",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        help=f"test share: the card's mAP and the parity gate (default {d.test_fraction})",
    )
    p.add_argument("--model-base", default="models", help="model repository (default ./models)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="named parameter set; flags override it"
    )
    p.add_argument("--alpha", type=float, help=f"depth multiplier (default {d.alpha})")
    p.add_argument("--image-size", type=int, help=f"input height = width (default {d.image_size})")
    p.add_argument("--geometry", choices=["stretch", "letterbox"], help=f"default {d.geometry}")
    p.add_argument("--resize-method", choices=["bilinear", "bicubic", "area", "nearest", "lanczos"])
    p.add_argument("--strides", type=_ints, help="anchor levels, e.g. 8,16,32,64")
    p.add_argument("--anchor-size-factor", type=float, help="anchor base size / stride")
    p.add_argument("--anchor-scales", type=_floats, help="e.g. 1,1.41")
    p.add_argument("--aspect-ratios", type=_floats, help="width/height, e.g. 1,2,0.5")
    p.add_argument("--fpn", dest="fpn", action="store_true", default=None, help="top-down neck")
    p.add_argument(
        "--fpn-channels", type=int, help=f"neck and head width (default {d.fpn_channels})"
    )
    p.add_argument(
        "--head-depth", type=int, help=f"separable layers per tower (default {d.head_depth})"
    )
    p.add_argument(
        "--shared-head",
        dest="shared_head",
        action="store_true",
        default=None,
        help="one head for all levels (per-level BN)",
    )
    p.add_argument("--positive-iou", type=float)
    p.add_argument("--negative-iou", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--crop-probability", type=float, help="share of images IoU-cropped")
    p.add_argument("--jitter-probability", type=float, help="share of images scale-jittered")
    p.add_argument("--seed", type=int)
    p.add_argument("--synthetic-images", type=int, help="synthetic training images")
    p.add_argument("--synthetic-val-images", type=int, help="synthetic validation images")
    p.add_argument("--synthetic-test-images", type=int, help="synthetic test images")
    p.add_argument("--synthetic-dir", help="keep the synthetic COCO set here (default: temporary)")
    p.add_argument("--nms-iou", type=float)
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--max-detections", type=int)
    p.add_argument("--bn-momentum", help="auto | keras | a number")
    p.add_argument("--no-precise-bn", dest="precise_bn", action="store_false", default=None)
    p.add_argument(
        "--max-parity-gap",
        type=float,
        help="tolerance of the parity gate: per-image top-detection hit rate (0..1); "
        "refused when inference mode is significantly worse by more than this",
    )
    p.add_argument(
        "--reference-images",
        type=int,
        help="held-out images shipped with the version for calibration's mAP gate (default 200)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        help=f"validation mAP@.5 every N epochs (default {d.eval_every}; 0: never)",
    )
    p.add_argument(
        "--patience",
        type=int,
        help="validation checks without a better mAP@.5 before training stops; the best "
        f"checked weights are kept (default {d.patience}; 0: no early stopping)",
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


def config_from_args(args: argparse.Namespace) -> DetectorTrainConfig:
    """Preset values first, then every flag that was given."""
    fields = {f.name for f in dataclasses.fields(DetectorTrainConfig)}
    values: dict[str, Any] = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    for key, value in vars(args).items():
        if key in fields and value is not None:
            values[key] = value
    return DetectorTrainConfig(**values)


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run report on stdout (human lines, then one JSON line)."""
    print("\n== summary ==")
    print(
        f"held-out COCO mAP@[.5:.95] {summary['map_50_95']:.4f}, mAP@.5 {summary['map_50']:.4f}, "
        f"mAP@.75 {summary['map_75']:.4f} (test split, {summary['test_images']} images, "
        "inference mode)"
    )
    print("per-class AP@[.5:.95]:")
    for label, ap in summary["per_class_ap"].items():
        print(f"  {label:>12}: {'n/a' if ap is None else f'{ap:.4f}'}")
    p = summary["parity"]
    print(
        f"parity (per-image top detection at IoU .5): inference {p['inference_mode']:.4f} vs "
        f"training mode {p['training_mode']:.4f}, gap {p['gap']:.4f} (tolerance "
        f"{p['threshold']}, p = {p['p_value']:.2g} on {p['images']} images: {p['decision']}); "
        f"mAP@.5 {p['map_50']['inference_mode']:.4f} vs {p['map_50']['training_mode']:.4f}"
    )
    t = summary["inference"]
    print(
        f"model: {summary['parameters']} parameters; in-process inference "
        f"{t['batch_1_ms']} ms at batch 1, "
        + ", ".join(
            f"{v} ms/image at {k.split('_')[1]}" for k, v in t.items() if k.endswith("per_image")
        )
    )
    print(f"training time: {summary['train_seconds']} s ({summary['fit_seconds']} s fitting)")
    if "exported" in summary:
        print(
            f"exported: {summary['exported']} (version {summary['version']}, "
            f"{summary['saved_model_bytes']} bytes)"
        )
    shown = {k: v for k, v in summary.items() if k not in ("model", "postprocess", "history")}
    print(json.dumps(shown, default=str, sort_keys=True))


def run_detector(args: argparse.Namespace) -> dict[str, Any]:
    """The ``detector`` command: train, evaluate, print the summary, export.

    Exits with status 2 for bad parameters or unusable data and 3 for a failed parity or
    staleness check.
    """
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    try:
        summary = train_detector(cfg)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except ExportRefused as exc:  # parity or staleness
        if exc.summary:  # the figures of the refused run: what the gate judged
            print_summary(exc.summary)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(3) from exc
    print_summary(summary)
    return {k: v for k, v in summary.items() if k not in ("model", "postprocess")}
