"""Drift acceptance report: in-distribution false alarms and detection of input shifts.

For a served model version (default: the demo classifier), fresh synthetic
images go through the gateway's preprocessing and the exported signature, and
the per-image probe rows are pooled exactly as the gateway's count window pools
them (``contract.drift_scores``), against the model card's alarm thresholds.

- In distribution: the share of windows of ``--window`` images whose score stays
  below the threshold on every probe layer and score.
- Per shift (brightness +30%, contrast x0.5, Gaussian noise sigma=0.1, blur,
  colour inversion, a different synthetic background): the score of a window of
  shifted images, and the number of shifted images that must enter a window full
  of clean traffic before the alarm fires.

Usage: python bench/drift_acceptance.py [--model-base models] [--name demo_classifier]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.tf_environment import prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()  # before TensorFlow's import: no doomed cuInit on a CPU host

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from contract import drift_scores  # noqa: E402
from contract.model_card import ModelCard, read_model_card  # noqa: E402
from contract.preprocessing import PreprocessSpec, preprocess_pixels  # noqa: E402
from contract.repository import ModelRepository  # noqa: E402
from training import synthetic  # noqa: E402

SHIFTS = [
    "brightness+30%",
    "contrast*0.5",
    "noise_sigma0.1",
    "blur",
    "inversion",
    "background:checker",
]


def traffic(card: ModelCard, n: int, seed: int, background: str | None = None) -> list[np.ndarray]:
    """``n`` synthetic images of the model's training distribution (or another background)."""
    if card.task == "detection":
        from training.detection.data import SyntheticConfig, render_synthetic

        config = SyntheticConfig(backgrounds=(background,)) if background else SyntheticConfig()
        rng = np.random.default_rng(seed)
        return [render_synthetic(rng, config)[0] for _ in range(n)]
    # Clean traffic has the training data's class mix (a different mix is label shift).
    imbalance = float(card.lineage.parameters.get("synthetic_imbalance", 1.0))
    return synthetic.generate(n, seed=seed, imbalance=imbalance, background=background)[0]


def probe_rows(
    serve, spec: PreprocessSpec, images: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([preprocess_pixels(img, spec)[0] for img in images])
    means, sqmeans = [], []
    for i in range(0, len(x), 64):
        out = serve(images=tf.constant(x[i : i + 64]))
        means.append(out["bn_input_mean"].numpy())
        sqmeans.append(out["bn_input_sqmean"].numpy())
    return np.concatenate(means).astype(np.float64), np.concatenate(sqmeans).astype(np.float64)


def alarms(scores: dict, thr: dict) -> list[str]:
    return [
        f"{layer}.{s}"
        for layer in scores
        for s in drift_scores.SCORES
        if scores[layer][s] > thr[layer][s]
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-base", default="models")
    ap.add_argument("--name", default="demo_classifier")
    ap.add_argument("--version", type=int)
    ap.add_argument("--clean-images", type=int, default=1500)
    ap.add_argument("--windows", type=int, default=300)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)

    repo = ModelRepository(args.model_base)
    version = args.version or repo.labels(args.name).get("stable") or max(repo.versions(args.name))
    vdir = repo.version_dir(args.name, version)
    card = read_model_card(vdir)
    spec = card.preprocess_spec
    serve = tf.saved_model.load(str(vdir)).signatures["serving_default"]
    probes = drift_scores.probe_references(card)
    thr = drift_scores.thresholds(card)
    drift = card.bn_reference.drift
    if drift is None or drift.window is None:
        print(f"{args.name} v{version} has no drift reference", file=sys.stderr)
        return 2
    window = int(drift.window)
    rng = np.random.default_rng(args.seed)

    clean_imgs = traffic(card, args.clean_images, args.seed)
    cm, cs = probe_rows(serve, spec, clean_imgs)
    quiet = 0
    for _ in range(args.windows):
        idx = rng.choice(len(cm), size=window, replace=False)
        quiet += not alarms(drift_scores.pooled_scores(cm[idx], cs[idx], probes), thr)
    print(f"model {args.name} v{version}, window {window} images")
    print(
        f"in-distribution: {quiet}/{args.windows} windows below every threshold "
        f"({100 * quiet / args.windows:.1f}%)"
    )

    layers = [p.name for p in probes]
    header = "| shift | " + " | ".join(
        f"{layer} shift / KL (thr {thr[layer]['mean_shift']:.3g} / {thr[layer]['sym_kl']:.3g})"
        for layer in layers
    )
    print()
    print(header + " | images to alarm |")
    print("|" + "---|" * (len(layers) + 2))
    base = window
    for name in SHIFTS:
        if name.startswith("background:"):
            imgs = traffic(card, window, args.seed + 1, background=name.split(":")[1])
        else:
            src = traffic(card, window, args.seed + 1)
            imgs = [synthetic.corrupt(name, img, rng) for img in src]
        sm, ss = probe_rows(serve, spec, imgs)
        scores = drift_scores.pooled_scores(sm, ss, probes)
        # Traffic switches from clean to shifted: after k shifted images the window
        # holds (window - k) clean and k shifted images.
        needed = None
        clean_idx = rng.choice(len(cm), size=base, replace=False)
        for k in range(1, window + 1):
            m = np.concatenate([cm[clean_idx[: base - k]], sm[:k]])
            s = np.concatenate([cs[clean_idx[: base - k]], ss[:k]])
            if alarms(drift_scores.pooled_scores(m, s, probes), thr):
                needed = k
                break
        cells = [
            f"{scores[layer]['mean_shift']:.3g} / {scores[layer]['sym_kl']:.3g}" for layer in layers
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {needed if needed else f'> {window}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
