"""Detector calibration report: COCO mAP before and after online calibration.

For the served detector (default: the demo detector, version ``stable``), per
input shift (contrast x0.5 plus Gaussian noise sigma 0.1; a Gaussian blur):

1. a copy of the model repository serves the parent; fresh synthetic images of
   the training distribution are shifted and go through the real capture store
   as one-image requests (detector feedback carries no boxes: none is sent);
2. ``calibration.dispatch.calibrate`` (the same call as ``python -m training
   calibrate``, default options) re-estimates the BN statistics, gates on the
   version's shipped reference set, and publishes version N+1 or rejects it;
3. the parent's and the candidate's exported SavedModels are scored with
   pycocotools on separate clean and shifted test sets, boxes in original pixels.

Then the gate on noise images: it must reject, and ``models.config`` must not
change.

A version exported before detectors shipped a reference set gets one here,
rebuilt from its own held-out synthetic set (the card's lineage has the seed and
sizes); that works for versions trained on ``--data synthetic`` only.

Usage: python bench/detector_calibration.py [--model-base models] [--name demo_detector]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibration.capture_store import SampleStore  # noqa: E402
from calibration.config import CalibrationConfig  # noqa: E402
from calibration.dispatch import calibrate  # noqa: E402
from contract.model_card import load_model_card, write_model_card  # noqa: E402
from contract.preprocessing import PreprocessSpec, preprocess_pixels  # noqa: E402
from contract.repository import ModelRepository  # noqa: E402
from training.detection.data import SyntheticConfig, load_coco, write_synthetic_coco  # noqa: E402
from training.detection.evaluate import (  # noqa: E402
    DetectionMetrics,
    coco_metrics,
    detections_to_coco,
    preprocess_images,
)
from training.detection.reference import REFERENCE_SET, describe, reference_set_bytes  # noqa: E402
from training.synthetic import corrupt  # noqa: E402

SHIFTS = ("contrast*0.5+noise_sigma0.1", "blur")


def attach_reference_set(version_dir: Path, spec: PreprocessSpec, work: Path) -> str:
    """Give a version exported without a reference set one from its held-out synthetic set."""
    card = load_model_card(version_dir)
    if (version_dir / "assets.extra" / REFERENCE_SET).exists():
        return "shipped"
    params = card["lineage"]["parameters"]
    if params.get("data") != "synthetic":
        raise SystemExit(
            f"{version_dir} has no reference set and was not trained on synthetic data"
        )
    # train_detector's held-out stream: the same seed offset and count.
    val = load_coco(
        write_synthetic_coco(
            work / "reference", params["synthetic_val_images"], seed=params["seed"] + 1_000_003
        )
    )
    count = int(params.get("reference_images", 200))
    blob = reference_set_bytes(val, val.load_images(), spec, count, params["seed"])
    (version_dir / "assets.extra" / REFERENCE_SET).write_bytes(blob)
    write_model_card(version_dir, {**card, "reference_set": describe(blob)})
    return "rebuilt from the version's held-out synthetic set"


def served_map(version_dir: Path, images: list[np.ndarray], dataset, spec) -> DetectionMetrics:
    sig = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    x, geoms = preprocess_images(images, spec)
    parts = [
        {k: v.numpy() for k, v in sig(images=tf.constant(x[i : i + 50])).items()}
        for i in range(0, len(x), 50)
    ]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    dets = detections_to_coco(
        [s.image_id for s in dataset.samples], out, geoms, dataset.category_ids
    )
    return coco_metrics(dataset.to_coco(), dets, dataset.labels)


def capture(store_dir: Path, name: str, version: int, images, spec) -> None:
    store = SampleStore(store_dir, rate=1.0)
    for pixels in images:
        x, _ = preprocess_pixels(pixels, spec)
        store.capture(name, version, str(uuid.uuid4()), x[None], None, force=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-base", default="models")
    ap.add_argument("--name", default="demo_detector")
    ap.add_argument("--traffic", type=int, default=512, help="captured shifted images")
    ap.add_argument("--test", type=int, default=250, help="test images per domain")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument(
        "--prior-strength",
        default="auto",
        help="passed to calibrate; with a number a rejected candidate is measured too",
    )
    ap.add_argument("--out", default=".bench/detector_calibration.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="detector-calibration-"))
    rng = np.random.default_rng(args.seed)
    rows = []
    report = {"name": args.name, "seed": args.seed, "prior": args.prior_strength, "shifts": {}}
    try:
        source = Path(args.model_base)
        parent_version = ModelRepository(source).labels(args.name)["stable"]
        cfg = SyntheticConfig()
        test = load_coco(write_synthetic_coco(work / "test", args.test, seed=args.seed + 1))
        test_images = test.load_images()
        for shift in (*SHIFTS, "noise images"):
            base = work / shift.replace("*", "x") / "models"
            shutil.copytree(source, base, ignore=shutil.ignore_patterns("rejected", ".*"))
            parent_dir = base / args.name / str(parent_version)
            spec = PreprocessSpec.from_dict(load_model_card(parent_dir)["preprocessing"])
            report["reference_set"] = attach_reference_set(parent_dir, spec, work)
            if shift == "noise images":
                traffic = list(
                    rng.integers(0, 256, (args.traffic // 4, 120, 130, 3), dtype=np.uint8)
                )
            else:
                drawn = load_coco(
                    write_synthetic_coco(
                        base.parent / "traffic", args.traffic, seed=args.seed + 2, config=cfg
                    )
                )
                traffic = [corrupt(shift, p, rng) for p in drawn.load_images()]
            samples = base.parent / "samples"
            capture(samples, args.name, parent_version, traffic, spec)
            config_before = (base / "models.config").read_bytes()
            started = time.monotonic()
            prior = (
                args.prior_strength if args.prior_strength == "auto" else float(args.prior_strength)
            )
            result = calibrate(
                CalibrationConfig(
                    model_base=base, name=args.name, samples_dir=samples, prior_strength=prior
                )
            )
            seconds = time.monotonic() - started
            entry = {
                "status": result.status,
                "reasons": result.reasons,
                "prior_strength": result.prior_strength,
                "seconds": round(seconds, 1),
                "gate": [c.to_dict() for c in result.checks],
                "prior_search": result.prior_search,
            }
            if shift == "noise images":
                entry["models_config_unchanged"] = (
                    base / "models.config"
                ).read_bytes() == config_before
                report["noise"] = entry
                print(
                    f"noise images: {result.status} ({'; '.join(result.reasons)}); "
                    f"models.config unchanged: {entry['models_config_unchanged']}"
                )
                continue
            shifted = [corrupt(shift, p, rng) for p in test_images]
            before = {
                "clean": served_map(parent_dir, test_images, test, spec),
                "shifted": served_map(parent_dir, shifted, test, spec),
            }
            after = {
                "clean": served_map(result.path, test_images, test, spec),
                "shifted": served_map(result.path, shifted, test, spec),
            }
            lost = before["clean"].map_50_95 - before["shifted"].map_50_95
            gained = after["shifted"].map_50_95 - before["shifted"].map_50_95
            entry.update(
                {
                    "before": {k: v.to_dict() for k, v in before.items()},
                    "after": {k: v.to_dict() for k, v in after.items()},
                    "recovered": gained / lost if lost > 0 else None,
                }
            )
            report["shifts"][shift] = entry
            rows.append(
                f"| {shift} | {result.status} | {before['clean'].map_50_95:.3f} | "
                f"{before['shifted'].map_50_95:.3f} | {after['shifted'].map_50_95:.3f} | "
                + (f"{gained / lost:.0%}" if lost > 0 else "n/a")
                + f" | {after['clean'].map_50_95:.3f} | {before['shifted'].map_50:.3f} | "
                f"{after['shifted'].map_50:.3f} | {result.prior_strength:.0f} | {seconds:.0f} s |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| shift | outcome | clean mAP before | shifted mAP before | shifted mAP after | "
        "recovered | clean mAP after | shifted mAP@.5 before | after | prior N | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nfull report: {out}")
    ok = report["noise"]["status"] == "rejected" and report["noise"]["models_config_unchanged"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
