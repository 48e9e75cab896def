"""The classifier run's configuration: flags, presets, augmentation names, gates.

One frozen-after-parsing config per run (:class:`ClassifierConfig`); the CLI
builds it from flags over a named preset, and the summary names any export gate
a preset loosened (:func:`loosened_gates`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.preprocessing import PreprocessSpec
from training import synthetic

#: The augmentations ``--augment`` offers, in the order they are applied.
AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast")


def parse_augment(value: str | bool) -> str:
    """Canonical ``--augment`` value: known names in :data:`AUGMENTATIONS` order, or "none".

    ``True``/``False`` (the old boolean field, as in older cards' parameters) mean the
    default list and "none".
    """
    if value is True:
        return ClassifierConfig.augment
    if value is False:
        return "none"
    names = {n.strip() for n in str(value).split(",") if n.strip()}
    if not names or names == {"none"}:
        return "none"
    unknown = sorted(names - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(
            f"unknown augmentation(s) {unknown}: choose from {', '.join(AUGMENTATIONS)} or none"
        )
    return ",".join(n for n in AUGMENTATIONS if n in names)


@dataclass
class ClassifierConfig:
    """Parameters of one classifier run (the CLI flags map one-to-one)."""

    data: str = "synthetic"  # a class-folder directory, or "synthetic"
    model_base: str = "models"
    name: str = "classifier"
    alpha: float = 0.35
    image_size: int = 96
    resize_method: str = "bilinear"
    geometry: str = "stretch"
    weights: str = "none"  # none | imagenet | path to a backbone .weights.h5
    epochs: int = 20
    head_epochs: int = 3  # frozen-backbone epochs (pretrained weights only)
    fine_tune_layers: int = 60  # top backbone layers unfrozen for fine-tuning (-1: all)
    batch_size: int = 64
    learning_rate: float = 3e-3
    fine_tune_learning_rate: float = 3e-4
    schedule: str = "cosine"  # cosine | exponential
    warmup_epochs: float = 1.0
    dropout: float = 0.2
    label_smoothing: float = 0.0
    # Comma list of AUGMENTATIONS, or "none". No flip by default: it is wrong for
    # digits, text and anything with handedness (on digits it cost 13 points).
    augment: str = "rotate,zoom,contrast"
    patience: int = 6
    val_fraction: float = 0.15  # early stopping and the LR schedule
    test_fraction: float = 0.15  # the card's held-out figures and the parity gate
    seed: int = 0
    synthetic_images: int = 3000
    synthetic_imbalance: float = 2.0
    synthetic_classes: int = len(synthetic.CLASSES)  # use the first k shape classes
    bn_momentum: str = "auto"  # auto | keras (leave 0.999) | a number
    precise_bn: bool = True
    max_parity_gap: float = 0.02
    force: bool = False
    version_labels: tuple[str, ...] = ("stable",)
    reference_images: int = 256
    verbose: int | None = None
    preset: str | None = None  # the PRESETS entry the CLI started from, if any
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1.4:
            raise ValueError("alpha must be in (0, 1.4]")
        if self.image_size < 32:
            raise ValueError("MobileNetV2 needs an input of at least 32x32")
        if self.schedule not in ("cosine", "exponential"):
            raise ValueError("schedule must be cosine or exponential")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        self.augment = parse_augment(self.augment)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(
            height=self.image_size,
            width=self.image_size,
            resize_method=self.resize_method,
            geometry=self.geometry,
            decode_oversample=2.0,  # photo-sized decoding (contract.preprocessing)
        )


PRESETS: dict[str, dict[str, Any]] = {
    # The demo model `make models` builds: <= 10 minutes on 2 CPU cores.
    "demo": dict(
        alpha=0.35,
        image_size=96,
        epochs=40,
        batch_size=64,
        synthetic_images=5000,
        synthetic_imbalance=2.0,
        learning_rate=1e-2,
        patience=8,
    ),
    # Seconds, for tests (with a small, easy dataset). About 60 held-out images make
    # the parity estimate noisy, hence the wider gap. 20 epochs (300 steps): with 10 the
    # held-out accuracy of the same seed ranged from 0.49 to 0.81 between runs (CPU
    # threads are not bit-reproducible); with 20 it was 0.81-0.86; the epochs after the
    # first (tracing) cost about a second each.
    "tiny": dict(
        alpha=0.35,
        image_size=32,
        epochs=20,
        batch_size=16,
        learning_rate=0.01,
        synthetic_images=300,
        reference_images=32,
        patience=100,
        max_parity_gap=0.1,
    ),
}


#: Settings that guard what gets exported, and which way is looser: a preset that
#: moves one of them that way is named in the run's summary.
GATES: dict[str, str] = {
    "max_parity_gap": "higher",  # a wider parity gap passes
    "patience": "higher",  # early stopping later (100: never, on a tiny run)
    "force": "higher",  # export despite a failed check
}


def describe_presets() -> str:
    """One line per preset with the values it sets (for ``--help``)."""
    return "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
        for name, values in sorted(PRESETS.items())
    )


def loosened_gates(cfg: ClassifierConfig) -> list[str]:
    """The gates ``cfg.preset`` loosened (a flag that overrode the preset does not count)."""
    values = PRESETS.get(cfg.preset or "", {})
    default = ClassifierConfig()
    out = []
    for name, looser in GATES.items():
        ran, usual = getattr(cfg, name), getattr(default, name)
        set_by_preset = name in values and ran == values[name]
        if set_by_preset and ran != usual and (ran > usual) == (looser == "higher"):
            out.append(f"preset {cfg.preset} sets {name}={ran} (default {usual})")
    return out
