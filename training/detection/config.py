"""The detector run's parameters: :class:`DetectorTrainConfig` and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.preprocessing import PreprocessSpec
from training.detection.anchors import AnchorConfig
from training.detection.augment import NO_AUGMENT, AugmentConfig
from training.detection.matching import MatchConfig
from training.detection.model import DetectorConfig
from training.detection.postprocess import NmsConfig


@dataclass
class DetectorTrainConfig:
    """Parameters of one detector run (the CLI flags map one-to-one)."""

    data: str = "synthetic"  # a COCO annotation JSON, or "synthetic"
    images: str | None = None  # image folder of ``data`` (default: beside the JSON)
    val_data: str | None = None  # held-out COCO JSON (default: a fraction of ``data``)
    val_images: str | None = None
    val_fraction: float = 0.1  # validation share: early stopping (training.detection.splits)
    test_fraction: float = 0.1  # test share: the card's mAP and the parity gate
    model_base: str = "models"
    name: str = "detector"
    alpha: float = 0.35
    image_size: int = 128
    geometry: str = "letterbox"
    resize_method: str = "bilinear"
    strides: tuple[int, ...] = (8, 16, 32, 64)
    anchor_size_factor: float = 1.5
    anchor_scales: tuple[float, ...] = (1.0, 2**0.5)
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5)
    fpn: bool = False
    fpn_channels: int = 64
    head_depth: int = 1
    shared_head: bool = False
    positive_iou: float = 0.5
    negative_iou: float = 0.4
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    augment: bool = True
    crop_probability: float = 0.2
    jitter_probability: float = 0.3
    seed: int = 0
    synthetic_images: int = 2000
    synthetic_val_images: int = 250
    synthetic_test_images: int = 250
    synthetic_dir: str | None = None  # where the synthetic COCO set is written (default: temp)
    nms_iou: float = 0.5
    score_threshold: float = 0.05
    max_detections: int = 100
    bn_momentum: str = "auto"  # auto | keras (leave 0.999) | a number
    precise_bn: bool = True
    precise_bn_images: int = 1024
    eval_every: int = 5  # validation mAP@.5 every N epochs (0: never; early stopping needs it)
    # Stop after this many validation checks without a better mAP@.5, and restore the
    # best checked weights (0: train every epoch, keep the last).
    patience: int = 4
    max_parity_gap: float = 0.05  # parity tolerance: per-image top-detection hit rate (0..1)
    reference_images: int = 200  # held-out images shipped for calibration's mAP gate
    force: bool = False
    version_labels: tuple[str, ...] = ("stable",)
    verbose: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        self.anchor_scales = tuple(float(s) for s in self.anchor_scales)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        self.version_labels = tuple(self.version_labels)
        if not 0 < self.alpha <= 1.4:
            raise ValueError("alpha must be in (0, 1.4]")
        if self.image_size < 32:
            raise ValueError("MobileNetV2 needs an input of at least 32x32")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch_size and learning_rate must be positive")
        if self.reference_images < 1:
            raise ValueError("reference_images must be >= 1")
        if (
            self.synthetic_images < 2
            or self.synthetic_val_images < 1
            or self.synthetic_test_images < 1
        ):
            raise ValueError(
                "the synthetic set needs >= 2 training, >= 1 validation and >= 1 test images"
            )
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1) or (
            self.val_fraction + self.test_fraction >= 1
        ):
            raise ValueError("val_fraction and test_fraction must be in (0, 1) with a sum below 1")
        # Validates geometry/resize method and the anchor/match/NMS values early.
        _ = self.spec, self.anchor_config, self.match_config, self.nms_config, self.augment_config

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(
            height=self.image_size,
            width=self.image_size,
            resize_method=self.resize_method,
            geometry=self.geometry,
            decode_oversample=2.0,  # photo-sized decoding (contract.preprocessing)
        )

    @property
    def anchor_config(self) -> AnchorConfig:
        return AnchorConfig(
            self.strides, self.anchor_size_factor, self.anchor_scales, self.aspect_ratios
        )

    @property
    def augment_config(self) -> AugmentConfig:
        if not self.augment:
            return NO_AUGMENT
        return AugmentConfig(
            crop_probability=self.crop_probability, jitter_probability=self.jitter_probability
        )

    @property
    def match_config(self) -> MatchConfig:
        return MatchConfig(self.positive_iou, self.negative_iou)

    @property
    def nms_config(self) -> NmsConfig:
        return NmsConfig(
            self.nms_iou, self.score_threshold, self.max_detections, self.max_detections
        )

    def detector_config(self, num_classes: int) -> DetectorConfig:
        return DetectorConfig(
            num_classes=num_classes,
            image_height=self.image_size,
            image_width=self.image_size,
            alpha=self.alpha,
            anchors=self.anchor_config,
            fpn=self.fpn,
            fpn_channels=self.fpn_channels,
            head_depth=self.head_depth,
            shared_head=self.shared_head,
        )


PRESETS: dict[str, dict[str, Any]] = {
    # The demo model `make models` builds: <= 15 minutes on 2 CPU cores,
    # mAP@.5 >= 0.9 and mAP@[.5:.95] >= 0.6 on held-out synthetic images.
    "demo": dict(
        alpha=0.35,
        image_size=128,
        epochs=35,
        batch_size=32,
        synthetic_images=2000,
        synthetic_val_images=250,
        learning_rate=3e-3,
    ),
    # Seconds, for tests.
    "tiny": dict(
        alpha=0.35,
        image_size=64,
        strides=(8, 16, 32),
        epochs=2,
        batch_size=8,
        synthetic_images=32,
        synthetic_val_images=8,
        synthetic_test_images=8,
        fpn_channels=16,
        head_depth=1,
        precise_bn_images=32,
    ),
}
