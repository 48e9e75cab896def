"""Detector calibration acceptance: COCO mAP before and after calibration with box feedback.

For the served detector (default: the demo detector, version ``stable``), per
input shift (contrast x0.5 plus Gaussian noise sigma 0.1; a Gaussian blur):

1. a copy of the model repository serves the parent; ``--traffic`` fresh
   synthetic images of the training distribution are shifted and go through the
   real capture store as one-image detect requests (with their geometry), and
   every other one gets box feedback through
   :func:`calibration.feedback.record_box_feedback`: its synthetic ground truth,
   boxes in original pixels, as a client would send them;
2. ``calibration.dispatch.calibrate`` (the same call as ``python -m training
   calibrate``) re-estimates the BN statistics, fine-tunes on the box feedback,
   gates, and publishes version N+1 or rejects it;
3. the parent's and the candidate's exported SavedModels are scored with
   pycocotools on separate clean and shifted test sets (the same fresh images,
   unshifted and shifted), boxes in original pixels, with 95 % intervals from a
   paired bootstrap over the test images.

Acceptance: at least :data:`TARGET_RECOVERED` of the mAP@[.5:.95] lost to the
shift recovered, the clean (source-domain) mAP within :data:`SOURCE_POINTS`
points of the parent's; then garbage box feedback (random boxes, one class
everywhere) on shifted traffic and noise images without feedback must both be
rejected with ``models.config`` unchanged.

A version exported before detectors shipped a reference set gets one here,
rebuilt from its own held-out synthetic set (the card's lineage has the seed and
sizes); that works for versions trained on ``--data synthetic`` only.

Usage: python bench/detector_calibration.py [--quick] [--model-base models]
       [--name demo_detector] [--traffic 512] [--test 250]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.tf_environment import prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()  # before TensorFlow's import: no doomed cuInit on a CPU host

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from calibration.capture_store import SampleStore  # noqa: E402
from calibration.config import CalibrationConfig  # noqa: E402
from calibration.dispatch import calibrate  # noqa: E402
from calibration.feedback import record_box_feedback  # noqa: E402
from contract.model_card import load_model_card, write_model_card  # noqa: E402
from contract.preprocessing import PreprocessSpec, preprocess_pixels  # noqa: E402
from contract.repository import ModelRepository  # noqa: E402
from training.detection.data import DetectionDataset, load_coco, write_synthetic_coco  # noqa: E402
from training.detection.evaluate import coco_metrics, detections_to_coco  # noqa: E402
from training.detection.reference import REFERENCE_SET, describe, reference_set_bytes  # noqa: E402
from training.synthetic import corrupt  # noqa: E402

SHIFTS = ("contrast*0.5+noise_sigma0.1", "blur")
#: Share of the mAP@[.5:.95] lost to a shift that calibration must win back.
TARGET_RECOVERED = 0.5
#: Largest fall of the clean (source-domain) mAP@[.5:.95], in points.
SOURCE_POINTS = 2.0
#: Options of ``--quick``: a smoke run of a few minutes.
QUICK = {"traffic": 128, "test": 60, "bootstrap": 20, "min_fine_tune_labels": 32}


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


def served_outputs(version_dir: Path, images: list[np.ndarray], spec) -> tuple[dict, list]:
    """The exported signature's outputs on ``images`` and each image's geometry."""
    sig = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    pairs = [preprocess_pixels(p, spec) for p in images]
    x = np.stack([p[0] for p in pairs]).astype(np.float32)
    parts = [
        {k: v.numpy() for k, v in sig(images=tf.constant(x[i : i + 50])).items()}
        for i in range(0, len(x), 50)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, [p[1] for p in pairs]


def map_on(outputs: dict, geoms: list, dataset: DetectionDataset, idx: np.ndarray) -> float:
    """COCO mAP@[.5:.95] on the test images ``idx`` (repeats allowed: a bootstrap resample)."""
    samples = [
        dataclasses.replace(dataset.samples[int(i)], image_id=j + 1) for j, i in enumerate(idx)
    ]
    ds = DetectionDataset(dataset.labels, dataset.category_ids, samples)
    picked = {k: v[idx] for k, v in outputs.items()}
    dets = detections_to_coco(
        [s.image_id for s in samples], picked, [geoms[int(i)] for i in idx], ds.category_ids
    )
    return coco_metrics(ds.to_coco(), dets, ds.labels).map_50_95


def scored(runs: dict[str, tuple], test: DetectionDataset, boots: int, seed: int) -> dict:
    """mAP of each ``runs[key] = (outputs, geoms)`` on all test images, and paired resamples.

    One resample of image indices serves every run, so differences and the
    recovered share move together as between two draws of a test set.
    """
    every = np.arange(len(test))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(test), (boots, len(test)))
    return {
        k: (map_on(*run, test, every), np.array([map_on(*run, test, d) for d in draws]))
        for k, run in runs.items()
    }


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The central 95 % of bootstrap samples (NaN-free)."""
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def capture_with_boxes(
    store_dir: Path,
    name: str,
    version: int,
    drawn: tuple[DetectionDataset, list[np.ndarray]],
    spec: PreprocessSpec,
    garbage: np.random.Generator | None = None,
) -> int:
    """One-image detect requests; box feedback on every other one. Returns how many got boxes.

    The feedback is the image's synthetic ground truth (original pixels), or
    with ``garbage`` random boxes all of the first class.
    """
    dataset, images = drawn
    store = SampleStore(store_dir, rate=1.0)
    labels = dataset.labels
    sent = 0
    for i, (sample, pixels) in enumerate(zip(dataset.samples, images, strict=True)):
        x, geom = preprocess_pixels(pixels, spec)
        rid = str(uuid.uuid4())
        store.capture(
            name, version, rid, x[None], None, force=True, geometry=[geom], task="detection"
        )
        if i % 2:
            continue
        if garbage is None:
            objects = [
                {"label": labels[int(c)], "box": [float(v) for v in b]}
                for b, c in zip(sample.boxes, sample.classes, strict=True)
            ]
        else:
            h, w = pixels.shape[:2]
            y0, x0 = garbage.uniform(0, 0.7, 2) * (h, w)
            objects = [
                {
                    "label": labels[0],
                    "box": [y0, x0, y0 + garbage.uniform(0.1, 0.3) * h, x0 + 0.2 * w],
                }
            ]
        record_box_feedback(store_dir, rid, [objects], model=name, allowed=labels)
        sent += 1
    return sent


def fmt(point: float, boots: np.ndarray, scale: float = 1.0, spec: str = ".3f") -> str:
    """``point [lo, hi]``."""
    lo, hi = interval(boots)
    return f"{point * scale:{spec}} [{lo * scale:{spec}}, {hi * scale:{spec}}]"


def run_one(
    args: argparse.Namespace,
    base: Path,
    parent_version: int,
    spec: PreprocessSpec,
    traffic: tuple[DetectionDataset, list[np.ndarray]] | list[np.ndarray],
    garbage: np.random.Generator | None,
) -> tuple[dict, object]:
    """Capture ``traffic`` (with box feedback unless it is bare images), calibrate, report."""
    samples = base.parent / "samples"
    if isinstance(traffic, tuple):
        boxes = capture_with_boxes(samples, args.name, parent_version, traffic, spec, garbage)
    else:
        boxes = 0
        store = SampleStore(samples, rate=1.0)
        for pixels in traffic:
            x, geom = preprocess_pixels(pixels, spec)
            rid = str(uuid.uuid4())
            store.capture(
                args.name, parent_version, rid, x[None], None, force=True, geometry=[geom]
            )
    config_before = (base / "models.config").read_bytes()
    started = time.monotonic()
    result = calibrate(
        CalibrationConfig(
            model_base=base,
            name=args.name,
            samples_dir=samples,
            min_fine_tune_labels=args.min_fine_tune_labels,
            fine_tune_epochs=args.epochs,
            fine_tune_learning_rate=args.learning_rate,
            fine_tune_weight_mix=args.weight_mix,
            seed=args.seed,
        )
    )
    entry = {
        "status": result.status,
        "reasons": result.reasons,
        "box_feedback_images": boxes,
        "prior_strength": result.prior_strength,
        "prior_search": result.prior_search,
        "seconds": round(time.monotonic() - started, 1),
        "gate": [c.to_dict() for c in result.checks],
        "accuracy": result.accuracy,
        "samples": result.samples,
        "models_config_unchanged": (base / "models.config").read_bytes() == config_before,
    }
    return entry, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-base", default="models")
    ap.add_argument("--name", default="demo_detector")
    ap.add_argument("--traffic", type=int, default=512, help="captured shifted images")
    ap.add_argument("--test", type=int, default=250, help="test images per domain")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
    ap.add_argument("--epochs", type=int, help="fine_tune_epochs (default: the detector's)")
    ap.add_argument("--learning-rate", type=float, help="fine_tune_learning_rate (same)")
    ap.add_argument(
        "--weight-mix",
        type=float,
        default=CalibrationConfig.fine_tune_weight_mix,
        help="fine_tune_weight_mix",
    )
    ap.add_argument("--min-fine-tune-labels", type=int, default=96)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    ap.add_argument("--shifts", nargs="*", default=list(SHIFTS), choices=SHIFTS)
    ap.add_argument("--out", default=".bench/detector_calibration.json")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)

    work = Path(tempfile.mkdtemp(prefix="detector-calibration-"))
    rng = np.random.default_rng(args.seed)
    rows = []
    report = {"options": vars(args), "shifts": {}}
    try:
        source = Path(args.model_base)
        parent_version = ModelRepository(source).labels(args.name)["stable"]
        test = load_coco(write_synthetic_coco(work / "test", args.test, seed=args.seed + 1))
        test_images = test.load_images()
        for shift in (*args.shifts, "garbage feedback", "noise images"):
            base = work / shift.replace("*", "x").replace(" ", "_") / "models"
            shutil.copytree(source, base, ignore=shutil.ignore_patterns("rejected", ".*"))
            parent_dir = base / args.name / str(parent_version)
            spec = PreprocessSpec.from_dict(load_model_card(parent_dir)["preprocessing"])
            report["reference_set"] = attach_reference_set(parent_dir, spec, work)
            if shift == "noise images":
                traffic = list(
                    rng.integers(0, 256, (max(64, args.traffic // 4), 120, 130, 3), dtype=np.uint8)
                )
            else:
                kind = SHIFTS[0] if shift == "garbage feedback" else shift
                drawn = load_coco(
                    write_synthetic_coco(base.parent / "traffic", args.traffic, seed=args.seed + 2)
                )
                traffic = (drawn, [corrupt(kind, p, rng) for p in drawn.load_images()])
            garbage = np.random.default_rng(args.seed + 3) if shift == "garbage feedback" else None
            entry, result = run_one(args, base, parent_version, spec, traffic, garbage)
            if shift in ("garbage feedback", "noise images"):
                report[shift] = entry
                print(
                    f"{shift}: {result.status} ({'; '.join(result.reasons)}); "
                    f"models.config unchanged: {entry['models_config_unchanged']}",
                    flush=True,
                )
                continue
            shifted = [corrupt(shift, p, rng) for p in test_images]
            runs = {
                "parent_clean": served_outputs(parent_dir, test_images, spec),
                "parent_shifted": served_outputs(parent_dir, shifted, spec),
                "candidate_clean": served_outputs(result.path, test_images, spec),
                "candidate_shifted": served_outputs(result.path, shifted, spec),
            }
            m = scored(runs, test, args.bootstrap, args.seed)
            with np.errstate(divide="ignore", invalid="ignore"):
                lost = m["parent_clean"][1] - m["parent_shifted"][1]
                recovered = (m["candidate_shifted"][1] - m["parent_shifted"][1]) / lost
                recovered[lost <= 0] = np.nan
            point_lost = m["parent_clean"][0] - m["parent_shifted"][0]
            point_rec = (m["candidate_shifted"][0] - m["parent_shifted"][0]) / point_lost
            source_delta = m["candidate_clean"][0] - m["parent_clean"][0]
            boot_delta = m["candidate_clean"][1] - m["parent_clean"][1]
            entry.update(
                {
                    "map_50_95": {k: v[0] for k, v in m.items()},
                    "intervals": {k: interval(v[1]) for k, v in m.items()},
                    "recovered": point_rec,
                    "recovered_interval": interval(recovered),
                    "source_delta_points": 100 * source_delta,
                    "source_delta_interval": [100 * v for v in interval(boot_delta)],
                    "meets": bool(
                        result.status == "published"
                        and point_rec >= TARGET_RECOVERED
                        and -100 * source_delta <= SOURCE_POINTS
                    ),
                }
            )
            report["shifts"][shift] = entry
            rows.append(
                f"| {shift} | {result.status} | {fmt(*m['parent_clean'])} | "
                f"{fmt(*m['parent_shifted'])} | {fmt(*m['candidate_shifted'])} | "
                f"{fmt(point_rec, recovered, 100, '.0f')} % | {fmt(*m['candidate_clean'])} | "
                f"{fmt(source_delta, boot_delta, 100, '+.1f')} | {entry['seconds']:.0f} s |"
            )
            print(
                rows[-1] + (f" ({'; '.join(result.reasons)})" if result.reasons else ""), flush=True
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{args.traffic} captured images per shift ({args.traffic // 2} with box feedback), "
        f"{args.test} test images per domain, mAP@[.5:.95] with 95 % intervals from "
        f"{args.bootstrap} paired bootstrap resamples"
    )
    print(
        "\n| shift | outcome | clean, parent | shifted, parent | shifted, candidate | "
        "recovered | clean, candidate | clean change (points) | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for bad in ("garbage feedback", "noise images"):
        e = report[bad]
        print(
            f"{bad}: {e['status']}, failed: "
            + ", ".join(c["name"] for c in e["gate"] if c["gating"] and not c["passed"])
            + f"; models.config unchanged: {e['models_config_unchanged']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nfull report: {out}")
    rejected = all(
        report[b]["status"] == "rejected" and report[b]["models_config_unchanged"]
        for b in ("garbage feedback", "noise images")
    )
    met = all(e["meets"] for e in report["shifts"].values())
    return 0 if rejected and met else 1


if __name__ == "__main__":
    sys.exit(main())
