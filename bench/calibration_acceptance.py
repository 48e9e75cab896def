"""Calibration acceptance report: accuracy and ECE before and after online calibration.

For the served classifier (default: the demo classifier, version ``stable``), per
input shift (contrast x0.5 plus Gaussian noise sigma 0.1, a Gaussian blur, and mixed
traffic: half clean, half contrast + noise):

1. a copy of the model repository serves the parent; fresh synthetic images of
   the training distribution are shifted and go through the real capture store
   as one-image requests, with feedback (true labels) for ``--labelled`` of them;
2. ``calibration.dispatch.calibrate`` (the same call as ``python -m training
   calibrate``, default options) re-estimates the BN statistics, fine-tunes on
   the labelled feedback, fits the temperature, gates and publishes version N+1;
3. the parent's and the published candidate's exported SavedModels (what TF
   Serving and the gateway serve; the temperature is in the graph) are measured
   on separate test sets: clean and shifted images never seen by calibration.

Reported: clean and shifted accuracy of the parent, shifted accuracy after
calibration and the share of the lost accuracy it recovers, clean accuracy after
calibration, and ECE (15 bins) on the shifted test set before and after. Then
the gate on garbage samples (noise images; one class only): it must reject, and
``models.config`` must not change. Targets (issue 6): recover >= 50% of the lost
accuracy, clean accuracy within 2 points, ECE after <= 3%.

Each of ``--seeds`` draws its own traffic and test sets; the targets are judged on
the mean over the seeds. The recovered share is a ratio of two small differences
of accuracies measured on the same test images, so each row also gives its 95 %
interval from a paired bootstrap over the test images (clean, shifted before and
after resampled together), and the summary gives the interval of the mean over
seeds. With 1500 test images a shift that costs 2 points left the share uncertain
by about +-15 points per seed; the default is 4000.

Usage: python bench/calibration_acceptance.py [--model-base models] [--name demo_classifier]
       [--seeds 2024,7,99]
"""

from __future__ import annotations

import argparse
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
from calibration.feedback import record_feedback  # noqa: E402
from calibration.temperature import expected_calibration_error  # noqa: E402
from contract.model_card import read_model_card  # noqa: E402
from contract.preprocessing import PreprocessSpec, preprocess_pixels  # noqa: E402
from contract.repository import ModelRepository  # noqa: E402
from training import synthetic  # noqa: E402

#: The colour cast was tried (on the earlier uniform-colour domain) and dropped: the
#: demo classifier lost 0.4 points to it, so there was nothing to recover.
SHIFTS = ("contrast*0.5+noise_sigma0.1", "blur", "half:contrast*0.5+noise_sigma0.1")
#: ``half:NAME`` is mixed traffic, one of the known failures of BN re-estimation: every
#: other captured image shifted by NAME, the rest clean; the shifted test set is all NAME.
HALF = "half:"


def traffic_image(shift: str, image: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
    """Captured image ``i`` under ``shift`` (``half:`` leaves the even ones clean)."""
    if shift.startswith(HALF):
        return image if i % 2 == 0 else synthetic.corrupt(shift[len(HALF) :], image, rng)
    return synthetic.corrupt(shift, image, rng)


def model_inputs(images: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """The gateway's preprocessing of each native image, stacked."""
    return np.stack([preprocess_pixels(img, spec)[0] for img in images])


def served_probabilities(version_dir: Path, x: np.ndarray) -> np.ndarray:
    """``probabilities`` of the exported ``serving_default`` signature."""
    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    out = [
        fn(images=tf.constant(x[i : i + 128]))["probabilities"].numpy()
        for i in range(0, len(x), 128)
    ]
    return np.concatenate(out).astype(np.float64)


def quality(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, ECE) of probabilities against labels."""
    return float(np.mean(probs.argmax(1) == labels)), expected_calibration_error(probs, labels)


#: Bootstrap resamples of the test images per row.
BOOTSTRAP = 2000


def recovered_share(clean_ok: np.ndarray, before_ok: np.ndarray, after_ok: np.ndarray):
    """(after - before) / (clean - before) along the last axis of per-image correctness."""
    clean, before, after = (v.mean(-1) for v in (clean_ok, before_ok, after_ok))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(clean > before, (after - before) / (clean - before), np.nan)


def bootstrap_recovered(clean_ok, before_ok, after_ok, rng: np.random.Generator) -> np.ndarray:
    """The recovered share on ``BOOTSTRAP`` paired resamples of the test images.

    The clean and shifted test sets are the same images, so one resample of image
    indices serves all three correctness vectors: the share's numerator and
    denominator move together, as they do between two draws of a test set.
    """
    idx = rng.integers(0, len(clean_ok), (BOOTSTRAP, len(clean_ok)))
    return recovered_share(clean_ok[idx], before_ok[idx], after_ok[idx])


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The central 95 % of bootstrap samples (NaN-free)."""
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def capture(store_dir: Path, name: str, version: int, x: np.ndarray, labels, class_names) -> None:
    """One-image requests into the capture store; feedback where ``labels[i]`` is not None."""
    store = SampleStore(store_dir, rate=1.0)
    for i in range(len(x)):
        rid = uuid.uuid4().hex
        store.capture(name, version, rid, x[i : i + 1], predictions=[0])
        if labels[i] is not None:
            record_feedback(store_dir, rid, [class_names[int(labels[i])]])


def fresh_repo(model_base: Path, name: str, root: Path) -> Path:
    """A private copy of the repository (``models.config`` and ``name``'s versions)."""
    base = root / "models"
    base.mkdir(parents=True)
    shutil.copy2(model_base / "models.config", base / "models.config")
    shutil.copytree(model_base / name, base / name, ignore=shutil.ignore_patterns("rejected"))
    return base


def run_shifts(
    args, model_base, prior, parent, parent_dir, spec, classes, seed, test, traffic, boots
):
    """Per shift: capture shifted traffic with feedback, calibrate, measure; a row each.

    ``boots[(seed, shift)]`` receives the bootstrap samples of each published row's
    recovered share (for the interval of the mean over seeds).
    """
    rng = np.random.default_rng(seed)
    test_imgs, test_y, clean_x, parent_clean, clean_ok = test
    rows = []
    for shift in SHIFTS:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="calib-accept-") as tmp:
            base = fresh_repo(model_base, args.name, Path(tmp))
            config_before = (base / "models.config").read_text()
            shifted_test = model_inputs(
                [synthetic.corrupt(shift.removeprefix(HALF), im, rng) for im in test_imgs], spec
            )
            traffic_x = model_inputs(
                [traffic_image(shift, im, i, rng) for i, im in enumerate(traffic[0])], spec
            )
            labels = [int(y) if rng.random() < args.labelled else None for y in traffic[1]]
            capture(Path(tmp) / "samples", args.name, parent, traffic_x, labels, classes)
            result = calibrate(
                CalibrationConfig(
                    model_base=base,
                    name=args.name,
                    samples_dir=Path(tmp) / "samples",
                    prior_strength=prior,
                )
            )
            before_probs = served_probabilities(parent_dir, shifted_test)
            before = quality(before_probs, test_y)
            row = {
                "seed": seed,
                "shift": shift,
                "status": result.status,
                "reasons": result.reasons,
                "prior_strength": result.prior_strength,
                "prior_search": result.prior_search,
                "temperature": result.temperature,
                "clean_before": parent_clean[0],
                "shifted_before": before[0],
                "ece_before": before[1],
                "labelled": int(sum(lab is not None for lab in labels)),
                "config_changed": (base / "models.config").read_text() != config_before,
            }
            if result.passed:
                vdir = ModelRepository(base).version_dir(args.name, result.version)
                after_probs = served_probabilities(vdir, shifted_test)
                after = quality(after_probs, test_y)
                clean_after = quality(served_probabilities(vdir, clean_x), test_y)
                correct = (
                    clean_ok,
                    before_probs.argmax(1) == test_y,
                    after_probs.argmax(1) == test_y,
                )
                boots[(seed, shift)] = bootstrap_recovered(*correct, np.random.default_rng(seed))
                row.update(
                    shifted_after=after[0],
                    ece_after=after[1],
                    clean_after=clean_after[0],
                    recovered=float(recovered_share(*correct)),
                    recovered_ci95=interval(boots[(seed, shift)]),
                )
            row["seconds"] = time.monotonic() - t0
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)

    return rows


def meets(r: dict) -> bool:
    """Issue 6's targets: half the lost accuracy back, clean within 2 points, ECE <= 3 %."""
    return (
        r["recovered"] >= 0.5
        and r["clean_after"] >= r["clean_before"] - 0.02
        and r["ece_after"] <= 0.03
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-base", default="models")
    ap.add_argument("--name", default="demo_classifier")
    ap.add_argument("--traffic", type=int, default=1536, help="captured shifted images")
    ap.add_argument("--labelled", type=float, default=0.5, help="share of traffic with feedback")
    ap.add_argument("--test", type=int, default=4000, help="test images per domain")
    ap.add_argument("--prior-strength", default="auto", help="passed to calibrate")
    ap.add_argument(
        "--seeds",
        default="2024",
        help="comma-separated; each seed draws its own traffic and test sets",
    )
    ap.add_argument("--out", default=".bench/calibration.json")
    args = ap.parse_args(argv)

    model_base = Path(args.model_base).resolve()
    repo = ModelRepository(model_base)
    parent = repo.labels(args.name).get("stable")
    if parent is None:
        print(
            f"{args.name} has no stable version under {model_base}; run `make models`",
            file=sys.stderr,
        )
        return 2
    parent_dir = repo.version_dir(args.name, parent)
    card = read_model_card(parent_dir)
    spec = card.preprocess_spec
    classes = list(card.labels)
    imbalance = float(card.lineage.parameters.get("synthetic_imbalance", 1.0))
    prior: float | str = (
        args.prior_strength if args.prior_strength == "auto" else float(args.prior_strength)
    )

    rows = []
    boots: dict[tuple[int, str], np.ndarray] = {}
    seeds = [int(v) for v in args.seeds.split(",")]
    for seed in seeds:
        test_imgs, test_y = synthetic.generate(args.test, seed=seed + 1, imbalance=imbalance)
        traffic_imgs, traffic_y = synthetic.generate(
            args.traffic, seed=seed + 2, imbalance=imbalance
        )
        clean_x = model_inputs(test_imgs, spec)
        clean_probs = served_probabilities(parent_dir, clean_x)
        parent_clean = quality(clean_probs, test_y)
        print(
            f"model {args.name} v{parent} (stable), seed {seed}; clean test: {len(test_y)} "
            f"images, accuracy {parent_clean[0]:.4f}, ECE {parent_clean[1]:.4f}",
            flush=True,
        )
        rows += run_shifts(
            args,
            model_base,
            prior,
            parent,
            parent_dir,
            spec,
            classes,
            seed,
            (test_imgs, test_y, clean_x, parent_clean, clean_probs.argmax(1) == test_y),
            (traffic_imgs, traffic_y),
            boots,
        )
    # Garbage samples: noise images, and one class of the last seed's traffic.
    rng = np.random.default_rng(seeds[-1] + 3)
    garbage = []
    for kind in ("noise_images", "one_class"):
        with tempfile.TemporaryDirectory(prefix="calib-garbage-") as tmp:
            base = fresh_repo(model_base, args.name, Path(tmp))
            config_before = (base / "models.config").read_text()
            if kind == "noise_images":
                imgs = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(512)]
                labels = [int(rng.integers(len(classes))) for _ in imgs]
            else:
                imgs = [im for im, y in zip(traffic_imgs, traffic_y, strict=True) if y == 0][:512]
                labels = [0] * len(imgs)
            capture(
                Path(tmp) / "samples", args.name, parent, model_inputs(imgs, spec), labels, classes
            )
            result = calibrate(
                CalibrationConfig(
                    model_base=base,
                    name=args.name,
                    samples_dir=Path(tmp) / "samples",
                    prior_strength=prior,
                )
            )
            unchanged = (base / "models.config").read_text() == config_before
            garbage.append(
                {
                    "samples": kind,
                    "status": result.status,
                    "reasons": result.reasons,
                    "models_config_unchanged": unchanged,
                }
            )
            print(json.dumps(garbage[-1]), flush=True)

    print()
    print(
        "| seed | shift | clean before | shifted before | shifted after | recovered (95 % CI) "
        "| clean after | ECE before | ECE after | T | prior N | status |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        if r["status"] != "published":
            ok &= r["shift"].startswith(HALF)  # mixed traffic is reported, not a target
            print(
                f"| {r['seed']} | {r['shift']} | {r['clean_before']:.4f} | {r['shifted_before']:.4f} "
                f"| - | - | - | {r['ece_before']:.4f} | - | - | - "
                f"| rejected: {'; '.join(r['reasons'])} |"
            )
            continue
        print(
            f"| {r['seed']} | {r['shift']} | {r['clean_before']:.4f} | {r['shifted_before']:.4f} "
            f"| {r['shifted_after']:.4f} | {r['recovered']:.0%} "
            f"({r['recovered_ci95'][0]:.0%} to {r['recovered_ci95'][1]:.0%}) | {r['clean_after']:.4f} "
            f"| {r['ece_before']:.4f} | {r['ece_after']:.4f} | {r['temperature']:.3f} "
            f"| {r['prior_strength']:g} | {'meets targets' if meets(r) else 'misses a target'} |"
        )
    # The targets on the mean over seeds: one seed's 1500 test images leave the recovered
    # share uncertain by several points (the loss itself is only ~13 points).
    print()
    for shift in SHIFTS:
        done = [r for r in rows if r["shift"] == shift and r["status"] == "published"]
        if not done:
            continue
        mean = {k: float(np.mean([r[k] for r in done])) for k in ("recovered", "clean_after")}
        mean["ece_after"] = float(np.mean([r["ece_after"] for r in done]))
        mean["clean_before"] = float(np.mean([r["clean_before"] for r in done]))
        good = meets(mean)
        ok &= good or shift.startswith(HALF)
        lo, hi = interval(np.mean([boots[(r["seed"], shift)] for r in done], axis=0))
        print(
            f"{shift}: over {len(done)} seed(s) recovered {mean['recovered']:.0%} "
            f"(95 % CI {lo:.0%} to {hi:.0%}) "
            f"(min {min(r['recovered'] for r in done):.0%}, "
            f"max {max(r['recovered'] for r in done):.0%}), clean after {mean['clean_after']:.4f} "
            f"vs {mean['clean_before']:.4f}, ECE after {mean['ece_after']:.4f}: "
            f"{'meets targets' if good else 'misses a target'}"
            + (" (informational: mixed traffic is not a target)" if shift.startswith(HALF) else "")
        )
    print()
    for g in garbage:
        ok &= g["status"] == "rejected" and g["models_config_unchanged"]
        print(
            f"garbage ({g['samples']}): {g['status']}, models.config "
            f"{'unchanged' if g['models_config_unchanged'] else 'CHANGED'}: {'; '.join(g['reasons'])}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"model": f"{args.name}/{parent}", "shifts": rows, "garbage": garbage},
            indent=1,
            default=float,
        )
    )
    print(f"\nall targets met: {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
