"""The detector network: MobileNetV2 backbone, SSDLite head (optional FPN-lite neck).

- Backbone: ``keras.applications.MobileNetV2`` (``include_top=False``) with a
  configurable width multiplier ``alpha``; feature maps are taken at strides 8
  (``block_6_expand_relu``), 16 (``block_13_expand_relu``, SSDLite's first map)
  and 32 (``out_relu``), as the anchor strides ask.
- Neck: each backbone map is projected to ``fpn_channels`` by a 1x1 conv. With
  ``fpn``, a top-down pass then adds the upsampled coarser level to the finer
  one and a depthwise-separable conv smooths the sum, so small-object levels
  get the semantics of deep layers (as in SSDLite-MobileNetV2-FPNLite). It is
  off by default: on the synthetic demo data it learned more slowly within the
  demo's step budget.
- Extra layers (SSDLite): strides above 32 come from a chain of 1x1 conv ->
  3x3 depthwise stride 2 -> 1x1 conv blocks on the stride-32 level.
- Head (SSDLite): a class tower and a box tower of ``head_depth``
  depthwise-separable layers (3x3 depthwise + BN + ReLU6, 1x1 conv + BN +
  ReLU6), then a 1x1 prediction conv. With ``shared_head`` the conv weights are
  shared by all levels (each level keeps its own BN), as in RetinaNet.

The model takes preprocessed images ``[B, H, W, 3]`` and returns
``[class_logits [B, A, C], box_deltas [B, A, 4]]`` with anchors in
:func:`training.detection.anchors.generate_anchors` order. It is a flat
functional model (no nested sub-models), and each BN layer is called once, so
BN probes and precise BN see every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import keras

from training.detection.anchors import AnchorConfig, num_anchors

#: Backbone layer whose output is the feature map at each stride.
BACKBONE_LAYERS = {
    4: "block_3_expand_relu",
    8: "block_6_expand_relu",
    16: "block_13_expand_relu",
    32: "out_relu",
}

# Focal-loss prior (Lin et al.): start every anchor at p(object) = 0.01 so the
# first steps are not swamped by the background loss.
_PRIOR_PROBABILITY = 0.01


@dataclass(frozen=True)
class DetectorConfig:
    """Network shape; recorded in the model card."""

    num_classes: int
    image_height: int = 128
    image_width: int = 128
    alpha: float = 0.35
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    fpn: bool = False
    fpn_channels: int = 64
    head_depth: int = 1
    shared_head: bool = False

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.image_height < 32 or self.image_width < 32:
            raise ValueError("MobileNetV2 needs an input of at least 32x32")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        bad = [s for s in self.anchors.strides if s < 32 and s not in BACKBONE_LAYERS]
        if bad:
            raise ValueError(
                f"no backbone feature map at stride(s) {bad}; use {sorted(BACKBONE_LAYERS)}"
            )
        if self.fpn_channels < 8 or self.head_depth < 0:
            raise ValueError("fpn_channels must be >= 8 and head_depth >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "image_height": self.image_height,
            "image_width": self.image_width,
            "alpha": self.alpha,
            "anchors": self.anchors.to_dict(),
            "fpn": self.fpn,
            "fpn_channels": self.fpn_channels,
            "head_depth": self.head_depth,
            "shared_head": self.shared_head,
            "backbone": "MobileNetV2",
            "feature_layers": {
                str(s): BACKBONE_LAYERS.get(s, f"extra_{s}") for s in self.anchors.strides
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        return cls(
            num_classes=int(d["num_classes"]),
            image_height=int(d["image_height"]),
            image_width=int(d["image_width"]),
            alpha=float(d["alpha"]),
            anchors=AnchorConfig.from_dict(d["anchors"]),
            fpn=bool(d["fpn"]),
            fpn_channels=int(d["fpn_channels"]),
            head_depth=int(d["head_depth"]),
            shared_head=bool(d["shared_head"]),
        )


def _bn_relu(x, name: str):
    x = keras.layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu")(x)


def _conv_bn(x, filters: int, kernel: int, name: str, *, stride: int = 1, depthwise: bool = False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw"
        )(x)
    else:
        x = keras.layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
    return _bn_relu(x, name)


def _separable(x, filters: int, name: str, *, stride: int = 1):
    x = _conv_bn(x, 0, 3, f"{name}_dw", stride=stride, depthwise=True)
    return _conv_bn(x, filters, 1, f"{name}_pw")


def _extra_block(x, channels: int, name: str):
    """SSDLite extra layer: 1x1 (half width) -> 3x3 depthwise stride 2 -> 1x1."""
    x = _conv_bn(x, channels // 2, 1, f"{name}_reduce")
    x = _conv_bn(x, 0, 3, f"{name}_down", stride=2, depthwise=True)
    return _conv_bn(x, channels, 1, f"{name}_expand")


def _upsample_to(x, target, name: str):
    """Nearest-neighbour upsampling of ``x`` to ``target``'s rows and columns."""
    fy = -(-int(target.shape[1]) // int(x.shape[1]))
    fx = -(-int(target.shape[2]) // int(x.shape[2]))
    x = keras.layers.UpSampling2D((fy, fx), name=f"{name}_up")(x)
    dy, dx = int(x.shape[1]) - int(target.shape[1]), int(x.shape[2]) - int(target.shape[2])
    if dy or dx:  # odd sizes: 'same' stride-2 convs round up, so trim the excess
        x = keras.layers.Cropping2D(((0, dy), (0, dx)), name=f"{name}_crop")(x)
    return x


class _Tower:
    """A stack of depthwise-separable layers + a 1x1 prediction conv, per level or shared.

    Shared conv weights (one layer object called on every level) with a BN layer
    per level: levels differ in statistics, not in what a shape looks like.
    """

    def __init__(self, config: DetectorConfig, outputs_per_anchor: int, name: str, bias: float):
        self.config, self.name, self.per_anchor = config, name, outputs_per_anchor
        self.bias = bias
        self._shared = self._make_layers("") if config.shared_head else None

    def _make_layers(self, suffix: str) -> tuple[list, keras.layers.Layer]:
        c = self.config
        convs = []
        for i in range(c.head_depth):
            convs.append(
                (
                    keras.layers.DepthwiseConv2D(
                        3, padding="same", use_bias=False, name=f"{self.name}_{i}_dw{suffix}"
                    ),
                    keras.layers.Conv2D(
                        c.fpn_channels, 1, use_bias=False, name=f"{self.name}_{i}_pw{suffix}"
                    ),
                )
            )
        out = keras.layers.Conv2D(
            self.per_anchor * c.anchors.anchors_per_location,
            1,
            bias_initializer=keras.initializers.Constant(self.bias),
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name=f"{self.name}_out{suffix}",
        )
        return convs, out

    def __call__(self, x, stride: int):
        convs, out = self._shared or self._make_layers(f"_s{stride}")
        for i, (dw, pw) in enumerate(convs):
            x = _bn_relu(dw(x), f"{self.name}_{i}_dw_s{stride}")
            x = _bn_relu(pw(x), f"{self.name}_{i}_pw_s{stride}")
        x = out(x)
        return keras.layers.Reshape((-1, self.per_anchor), name=f"{self.name}_flat_s{stride}")(x)


def build_detector(config: DetectorConfig, *, seed: int | None = None) -> keras.Model:
    """A freshly initialised detector (backbone weights random: no download)."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((config.image_height, config.image_width, 3), name="images")
    backbone = keras.applications.MobileNetV2(
        input_tensor=inputs, alpha=config.alpha, include_top=False, weights=None
    )
    c = config.fpn_channels
    # Backbone levels the anchors use, plus stride 32 (the extras grow from it).
    taps = sorted({s for s in config.anchors.strides if s <= 32} | {32})
    levels: dict[int, Any] = {
        s: _conv_bn(backbone.get_layer(BACKBONE_LAYERS[s]).output, c, 1, f"neck_lateral_{s}")
        for s in taps
    }
    if config.fpn:
        for finer, coarser in zip(reversed(taps[:-1]), reversed(taps[1:]), strict=True):
            up = _upsample_to(levels[coarser], levels[finer], f"neck_topdown_{finer}")
            merged = keras.layers.Add(name=f"neck_add_{finer}")([levels[finer], up])
            levels[finer] = _separable(merged, c, f"neck_smooth_{finer}")
    x, stride = levels[32], 32
    for target in config.anchors.strides:
        while stride < target:
            stride *= 2
            x = _extra_block(x, c, f"extra_{stride}")
            levels[stride] = x

    class_bias = -math.log((1 - _PRIOR_PROBABILITY) / _PRIOR_PROBABILITY)
    class_tower = _Tower(config, config.num_classes, "head_class", class_bias)
    box_tower = _Tower(config, 4, "head_box", 0.0)
    class_outputs = [class_tower(levels[s], s) for s in config.anchors.strides]
    box_outputs = [box_tower(levels[s], s) for s in config.anchors.strides]

    def join(tensors, name):
        if len(tensors) == 1:
            return keras.layers.Identity(name=name)(tensors[0])
        return keras.layers.Concatenate(axis=1, name=name)(tensors)

    class_logits = join(class_outputs, "class_logits")
    box_deltas = join(box_outputs, "box_deltas")
    model = keras.Model(inputs, [class_logits, box_deltas], name="ssdlite_mobilenetv2")
    expected = num_anchors(config.anchors, config.image_height, config.image_width)
    if class_logits.shape[1] != expected:
        raise ValueError(
            f"the network predicts for {class_logits.shape[1]} anchors but the anchor "
            f"config gives {expected}: the input size does not suit the strides"
        )
    return model
