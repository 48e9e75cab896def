"""Detector fine-tuning on box feedback: what each setting gives the shifted and the clean domain.

The steps of the calibration path (``calibration/detector.py``) without its gate
and export, so that one run scores several settings quickly: precise-BN
statistics on the fit part of shifted traffic mixed with ``--source-weight`` of
the parent's, fine-tuning (:func:`calibration.detector_fine_tune.fine_tune_detector`)
on the box-labelled fit images plus the version's reference set, then the
weights at each ``--mix`` (parent + mix x (fine-tuned - parent), statistics
collected again), scored with pycocotools on fresh clean and shifted test
images (model-input pixels, inference mode).

``bench/detector_calibration.py`` is the acceptance (capture store, ``calibrate``,
gate, exported SavedModels, bootstrap intervals); this sweep is what chose its
defaults (docs/calibration.md). ``--reference-only`` fine-tunes on the reference
set alone (what fine-tuning costs the clean domain by itself); ``--extra-shifted N``
adds N more labelled shifted images (how far more box feedback would go).

Usage: python bench/detector_fine_tune_sweep.py [--shift blur] [--mix 0.5 1]
       [--source-weight 0.8] [--epochs 10] [--learning-rate 2e-3] [--seed 2024]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.tf_environment import prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()  # before TensorFlow's import: no doomed cuInit on a CPU host

import keras  # noqa: E402
import numpy as np  # noqa: E402

from calibration.config import FINE_TUNE_DEFAULTS, CalibrationConfig  # noqa: E402
from calibration.detector import postprocess_from_card  # noqa: E402
from calibration.detector_fine_tune import (  # noqa: E402
    anchor_targets,
    box_coding,
    fine_tune_detector,
    mix_weights,
)
from calibration.model_io import load_keras_model  # noqa: E402
from calibration.reestimate import reestimate_statistics  # noqa: E402
from contract.model_card import ModelCard, load_model_card  # noqa: E402
from contract.preprocessing import PreprocessSpec, preprocess_pixels  # noqa: E402
from contract.repository import ModelRepository  # noqa: E402
from training.detection.data import DetectionDataset, load_coco, write_synthetic_coco  # noqa: E402
from training.detection.evaluate import predict  # noqa: E402
from training.detection.reference import (  # noqa: E402
    REFERENCE_SET,
    load_reference_set,
    score_outputs,
)
from training.synthetic import corrupt  # noqa: E402

SHIFTS = ("contrast*0.5+noise_sigma0.1", "blur")


def model_inputs(
    work: Path, count: int, seed: int, spec: PreprocessSpec, shift: str | None
) -> tuple[np.ndarray, DetectionDataset]:
    """``count`` fresh synthetic images (``shift`` applied), as model inputs with their boxes."""
    drawn = load_coco(write_synthetic_coco(work / f"{seed}", count, seed=seed))
    rng = np.random.default_rng(seed)
    xs, samples = [], []
    for sample, pixels in zip(drawn.samples, drawn.load_images(), strict=True):
        x, geom = preprocess_pixels(corrupt(shift, pixels, rng) if shift else pixels, spec)
        xs.append(x)
        boxes = geom.boxes_to_input(sample.boxes).astype(np.float32)
        samples.append(
            dataclasses.replace(sample, height=spec.height, width=spec.width, boxes=boxes)
        )
    return np.stack(xs), DetectionDataset(drawn.labels, drawn.category_ids, samples)


def joined(parts: list[tuple[np.ndarray, DetectionDataset]]) -> tuple[np.ndarray, DetectionDataset]:
    """Images and samples of several datasets of one label set, in order."""
    first = parts[0][1]
    samples = [s for _, ds in parts for s in ds.samples]
    return np.concatenate([x for x, _ in parts]), DetectionDataset(
        first.labels, first.category_ids, samples
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    epochs, rate = FINE_TUNE_DEFAULTS["detection"]
    ap.add_argument("--model-base", default="models")
    ap.add_argument("--name", default="demo_detector")
    ap.add_argument("--shift", nargs="*", default=list(SHIFTS), choices=SHIFTS)
    ap.add_argument("--traffic", type=int, default=512, help="captured shifted images")
    ap.add_argument("--test", type=int, default=250, help="test images per domain")
    ap.add_argument("--source-weight", type=float, default=0.8, help="of the statistics")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--learning-rate", type=float, default=rate)
    ap.add_argument(
        "--mix", type=float, nargs="*", default=[CalibrationConfig.fine_tune_weight_mix, 1.0]
    )
    ap.add_argument("--reference-only", action="store_true", help="no traffic in the mix")
    ap.add_argument("--extra-shifted", type=int, default=0, help="more labelled shifted images")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)

    version = ModelRepository(args.model_base).labels(args.name)["stable"]
    vdir = Path(args.model_base) / args.name / str(version)
    card = ModelCard.from_json(load_model_card(vdir))
    spec = card.preprocess_spec
    anchors, match, variances = box_coding(card)
    ref = load_reference_set(vdir / "assets.extra" / REFERENCE_SET, spec, list(card.labels))
    postprocess = postprocess_from_card(card)
    print(
        "| shift | source weight | epochs | learning rate | trained on | mix "
        "| clean | shifted | recovered | clean change (points) |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory(prefix="detector-sweep-") as tmp:
        work = Path(tmp)
        clean = model_inputs(work / "test", args.test, args.seed + 1, spec, None)
        for shift in args.shift:
            keras.utils.set_random_seed(args.seed)
            model = load_keras_model(vdir)

            def score(x: np.ndarray, ds: DetectionDataset, model: keras.Model = model) -> float:
                return score_outputs(predict(model, postprocess, x, batch_size=64), ds).map_50_95

            traffic = model_inputs(work / "traffic", args.traffic, args.seed + 2, spec, shift)
            shifted = model_inputs(work / "test", args.test, args.seed + 1, spec, shift)
            parent = score(*clean), score(*shifted)
            rng = np.random.default_rng(args.seed)
            held = rng.random(args.traffic) < CalibrationConfig.holdout_fraction
            boxed = np.flatnonzero((np.arange(args.traffic) % 2 == 0) & ~held)
            stats = reestimate_statistics(model, traffic[0][~held], rng, 64)
            strength = args.source_weight / (1 - args.source_weight) * stats.images
            stats.assign(strength)
            parts = [(ref.x, ref.dataset)]
            trained_on = f"{len(ref)} reference"
            if not args.reference_only:
                feedback = traffic[1].subset(boxed.tolist())
                parts.insert(0, (traffic[0][boxed], feedback))
                trained_on = f"{len(boxed)} box-labelled + " + trained_on
            if args.extra_shifted:
                parts.append(
                    model_inputs(work / "extra", args.extra_shifted, args.seed + 3, spec, shift)
                )
                trained_on += f" + {args.extra_shifted} more shifted"
            x, dataset = joined(parts)
            targets = anchor_targets(dataset, anchors, match, variances)
            start = [v.numpy() for v in model.trainable_variables]
            started = time.monotonic()
            fine_tune_detector(
                model,
                x,
                targets,
                epochs=args.epochs,
                learning_rate=args.learning_rate,
                reestimate=partial(stats.collect_again, strength),
                seed=args.seed,
            )
            tuned = [v.numpy() for v in model.trainable_variables]
            for mix in args.mix:
                mix_weights(model.trainable_variables, start, tuned, mix)
                stats.collect_again(strength)
                cand = score(*clean), score(*shifted)
                recovered = (cand[1] - parent[1]) / (parent[0] - parent[1])
                print(
                    f"| {shift} | {args.source_weight:g} | {args.epochs} | {args.learning_rate:g} "
                    f"| {trained_on} | {mix:g} | {parent[0]:.3f} → {cand[0]:.3f} "
                    f"| {parent[1]:.3f} → {cand[1]:.3f} | {100 * recovered:.0f} % "
                    f"| {100 * (cand[0] - parent[0]):+.1f} |",
                    flush=True,
                )
            print(f"<!-- {shift}: fine-tuned in {time.monotonic() - started:.0f} s -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
