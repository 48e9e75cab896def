"""The model card: one JSON document that makes a model version self-describing.

Stored at ``<name>/<version>/assets.extra/model_card.json``. The gateway
configures preprocessing, labels, drift references and box mapping from it and
from nothing else. Required keys (``validate_model_card`` checks them):

- ``schema_version``, ``name``, ``version``, ``task`` (classification|detection),
  ``labels``, ``created_at`` (ISO 8601 UTC)
- ``input``: ``height``, ``width``, ``channels``, ``dtype``, ``tensor`` (input name)
- ``signature``: ``name`` and the ``inputs``/``outputs`` with dtype and shape
- ``preprocessing``: :class:`contract.preprocessing.PreprocessSpec` as a dict
- ``bn_reference``: ``probes`` (name, channels, offset into the probe vector,
  moving_mean, moving_variance, epsilon), ``total_channels`` and ``pixel_stats``
  (per-channel mean/variance of the training data in model-input space)
- ``metrics``: held-out quality and the inference/training-mode ``parity`` report
- ``calibration``: ``temperature`` and how it was fitted
- ``lineage``: parent version, dataset fingerprint, parameters, code revision

Optional sections: ``detection`` (anchors, NMS, box coding of a detector),
``reference_set`` (the labelled set under ``assets.extra/``) and ``training``.

The typed card
--------------
:class:`ModelCard` is the card as frozen dataclasses (``card.input.height``,
``card.bn_reference.probes``, ``card.calibration.temperature``).
:meth:`ModelCard.from_json` validates a JSON document (the checks and messages of
:func:`validate_model_card`) and :meth:`ModelCard.to_json` gives the document
back key for key and value for value: every section keeps the keys this version
does not model in ``extra``, and remembers which keys its document had, so a
card written by another version round-trips without loss and
:func:`write_model_card` writes the same bytes. Values are stored as read (an
integer stays an integer); JSON arrays become tuples and objects read-only
:class:`FrozenMap` s. A typed field whose key is absent holds its default; it is
written back only when the document had the key or the value differs from the
default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from contract.json_sections import JsonSection, empty_map, nested
from contract.preprocessing import PreprocessSpec

SCHEMA_VERSION = 1
MODEL_CARD_RELPATH = "assets.extra/model_card.json"
WARMUP_RELPATH = "assets.extra/tf_serving_warmup_requests"
KERAS_MODEL_RELPATH = "assets.extra/model.keras"
TASKS = ("classification", "detection")
REQUIRED = (
    "schema_version",
    "name",
    "version",
    "task",
    "labels",
    "created_at",
    "input",
    "signature",
    "preprocessing",
    "bn_reference",
    "metrics",
    "calibration",
    "lineage",
)


class ModelCardError(ValueError):
    """A model card that is missing, unreadable or incomplete."""


@dataclass(frozen=True)
class CardSection(JsonSection):
    """A section of the model card: malformed documents raise :class:`ModelCardError`."""

    ERROR: ClassVar[type[ValueError]] = ModelCardError


@dataclass(frozen=True)
class InputSpec(CardSection):
    """``input``: the model-input tensor's size, dtype and name."""

    PATH: ClassVar[str] = "input"
    height: int
    width: int
    channels: int
    dtype: str = "float32"
    tensor: str = "images"


@dataclass(frozen=True)
class TensorInfo(CardSection):
    """One signature input or output: dtype and shape (-1 for a free dimension)."""

    PATH: ClassVar[str] = "signature tensor"
    dtype: str | None = None
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Signature(CardSection):
    """``signature``: the exported signature's name, inputs and outputs."""

    PATH: ClassVar[str] = "signature"
    name: str = "serving_default"
    inputs: Mapping[str, TensorInfo] = nested("map", TensorInfo, default_factory=empty_map)
    outputs: Mapping[str, TensorInfo] = nested("map", TensorInfo, default_factory=empty_map)


@dataclass(frozen=True)
class ProbeReference(CardSection):
    """One BN probe: its layer, channels, offset into the probe vector and moving stats."""

    PATH: ClassVar[str] = "bn_reference.probes[]"
    name: str
    channels: int
    offset: int
    moving_mean: tuple[float, ...]
    moving_variance: tuple[float, ...]
    epsilon: float

    @property
    def slice(self) -> slice:
        """The probe's channels in ``bn_input_mean`` / ``bn_input_sqmean``."""
        return slice(self.offset, self.offset + self.channels)


@dataclass(frozen=True)
class PixelStats(CardSection):
    """``bn_reference.pixel_stats``: per-channel mean/variance of the training data."""

    PATH: ClassVar[str] = "bn_reference.pixel_stats"
    space: str | None = None
    mean: tuple[float, ...] = ()
    variance: tuple[float, ...] = ()
    images: int | None = None


@dataclass(frozen=True)
class DriftScoreReference(CardSection):
    """One layer's score distribution on held-out data and its alarm ``threshold``."""

    PATH: ClassVar[str] = "bn_reference.drift.layers[][]"
    threshold: float
    quantiles: Mapping[str, float] = field(default_factory=empty_map)


@dataclass(frozen=True)
class DriftReference(CardSection):
    """``bn_reference.drift``: the drift alarm's reference, per layer and score."""

    PATH: ClassVar[str] = "bn_reference.drift"
    window: int | None = None
    windows: int | None = None
    held_out_images: int | None = None
    alarm_quantile: float | None = None
    alarm_margin: float | None = None
    layers: Mapping[str, Mapping[str, DriftScoreReference]] = nested(
        "map", DriftScoreReference, depth=2, default_factory=empty_map
    )

    def thresholds(self) -> dict[str, dict[str, float]]:
        """Alarm thresholds per layer and score."""
        return {
            layer: {s: float(ref.threshold) for s, ref in by_score.items()}
            for layer, by_score in self.layers.items()
        }


@dataclass(frozen=True)
class BnReference(CardSection):
    """``bn_reference``: the BN probes, their channel total, pixel stats, drift reference."""

    PATH: ClassVar[str] = "bn_reference"
    probes: tuple[ProbeReference, ...] = nested("tuple", ProbeReference, default=())
    #: The sum of the probes' channels (always set in a validated card).
    total_channels: int | None = None
    pixel_stats: PixelStats | None = nested("one", PixelStats, default=None)
    drift: DriftReference | None = nested("one", DriftReference, default=None)

    @property
    def probe_names(self) -> list[str]:
        """The probes' layer names, in card order."""
        return [p.name for p in self.probes]


@dataclass(frozen=True)
class Parity(CardSection):
    """``metrics.parity``: inference-mode vs training-mode quality on held-out data."""

    PATH: ClassVar[str] = "metrics.parity"
    inference_mode: float | None = None
    training_mode: float | None = None
    gap: float | None = None
    distinct_predictions: int | None = None
    passed: bool | None = None
    #: The tolerance the gap is tested against (older cards: a fixed limit on the gap).
    threshold: float | None = None
    # The paired gate's figures (contract.parity); absent from older cards.
    images: int | None = None
    discordant: Mapping[str, int] = field(default_factory=empty_map)
    test: str | None = None
    p_value: float | None = None
    alpha: float | None = None
    interval: tuple[float, ...] = ()
    interval_method: str | None = None
    confidence: float | None = None
    collapsed: bool | None = None
    dominant_share: float | None = None
    decision: str | None = None
    #: Per-image outcome the pairs compare, when not accuracy (a detector's).
    paired_on: str | None = None


@dataclass(frozen=True)
class Staleness(CardSection):
    """``metrics.staleness``: the training data's own drift score against the BN stats."""

    PATH: ClassVar[str] = "metrics.staleness"
    images: int | None = None
    scores: Mapping[str, Mapping[str, float]] = field(default_factory=empty_map)
    limits: Mapping[str, float] = field(default_factory=empty_map)
    passed: bool | None = None
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Metrics(CardSection):
    """``metrics``: held-out quality (task-specific figures stay in ``extra``)."""

    PATH: ClassVar[str] = "metrics"
    parity: Parity | None = nested("one", Parity, default=None)
    staleness: Staleness | None = nested("one", Staleness, default=None)


@dataclass(frozen=True)
class Calibration(CardSection):
    """``calibration``: the served temperature and how it was fitted (the fit's report
    stays in ``extra``)."""

    PATH: ClassVar[str] = "calibration"
    temperature: float
    method: str | None = None


@dataclass(frozen=True)
class Lineage(CardSection):
    """``lineage``: where the version came from."""

    PATH: ClassVar[str] = "lineage"
    parent_version: int | None = None
    code_revision: str | None = None
    dataset: Mapping[str, Any] | None = None
    parameters: Mapping[str, Any] = field(default_factory=empty_map)


@dataclass(frozen=True)
class DetectionSpec(CardSection):
    """``detection``: a detector's anchors, NMS and box coding (the rest in ``extra``)."""

    PATH: ClassVar[str] = "detection"
    anchors: Mapping[str, Any] = field(default_factory=empty_map)
    nms: Mapping[str, Any] = field(default_factory=empty_map)
    box_variances: tuple[float, ...] = ()
    max_detections: int | None = None


@dataclass(frozen=True)
class ReferenceSet(CardSection):
    """``reference_set``: the labelled reference set stored under ``assets.extra/``."""

    PATH: ClassVar[str] = "reference_set"
    file: str | None = None
    images: int | None = None


@dataclass(frozen=True)
class ModelCard(CardSection):
    """The model card of one version, typed and frozen (see the module docstring).

    Build it with :meth:`from_json` (or :func:`read_model_card`); change it with
    :func:`dataclasses.replace`; write it with :func:`write_model_card`.
    """

    PATH: ClassVar[str] = "model card"
    schema_version: int
    name: str
    version: int
    task: str
    labels: tuple[str, ...]
    created_at: str
    input: InputSpec = nested("one", InputSpec)
    signature: Signature = nested("one", Signature)
    #: The ``preprocessing`` object as stored; :attr:`preprocess_spec` parses it.
    preprocessing: Mapping[str, Any]
    bn_reference: BnReference = nested("one", BnReference)
    metrics: Metrics = nested("one", Metrics)
    calibration: Calibration = nested("one", Calibration)
    lineage: Lineage = nested("one", Lineage)
    detection: DetectionSpec | None = nested("one", DetectionSpec, default=None)
    reference_set: ReferenceSet | None = nested("one", ReferenceSet, default=None)
    training: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str | None = None) -> ModelCard:
        """The typed card of a JSON document.

        Raises :class:`ModelCardError` for every failure :func:`validate_model_card`
        reports (with the same message), and for a document whose sections are
        not the JSON objects the card needs.
        """
        if not isinstance(doc, Mapping):
            raise ModelCardError("model card must be a JSON object")
        try:
            validate_model_card(doc)
        except ModelCardError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ModelCardError(f"model card is malformed: {exc!r}") from exc
        return super().from_json(doc, where)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The :class:`PreprocessSpec` of ``preprocessing`` (ValueError if it is unusable)."""
        return PreprocessSpec.from_dict(self.preprocessing)


def bn_reference_of(card: ModelCard | Mapping[str, Any]) -> BnReference:
    """The ``bn_reference`` of a typed card, or of a card as a JSON dict (possibly partial,
    e.g. ``{"bn_reference": {"probes": [...]}}``; nothing else is validated)."""
    if isinstance(card, ModelCard):
        return card.bn_reference
    return BnReference.from_json(card.get("bn_reference", {}))


# --- the JSON document -------------------------------------------------------------


def validate_model_card(card: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check the required structure; returns the card unchanged or raises ModelCardError."""
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ModelCardError(f"model card lacks {missing}")
    if card["task"] not in TASKS:
        raise ModelCardError(f"task must be one of {TASKS}, got {card['task']!r}")
    if not card["labels"] or not all(isinstance(x, str) for x in card["labels"]):
        raise ModelCardError("labels must be a non-empty list of strings")
    for key in ("height", "width", "channels"):
        if not isinstance(card["input"].get(key), int):
            raise ModelCardError(f"input.{key} must be an integer")
    ref = card["bn_reference"]
    total = 0
    for probe in ref.get("probes", []):
        if probe["offset"] != total or len(probe["moving_mean"]) != probe["channels"]:
            raise ModelCardError(f"probe {probe.get('name')} is inconsistent")
        total += probe["channels"]
    if ref.get("total_channels") != total:
        raise ModelCardError("bn_reference.total_channels does not match the probes")
    if "temperature" not in card["calibration"]:
        raise ModelCardError("calibration.temperature is required")
    return card


def _read_json(version_dir: str | os.PathLike[str]) -> Any:
    path = Path(version_dir) / MODEL_CARD_RELPATH
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelCardError(f"no model card at {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"model card {path} is not JSON: {exc}") from exc


def load_model_card(version_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate the model card of a version directory, as its JSON dict.

    Readers not yet converted to :func:`read_model_card` use it.
    """
    return validate_model_card(_read_json(version_dir))


def read_model_card(version_dir: str | os.PathLike[str]) -> ModelCard:
    """Read and validate the model card of a version directory."""
    return ModelCard.from_json(_read_json(version_dir))


def model_card_text(card: ModelCard | Mapping[str, Any]) -> str:
    """The card's file contents, as :func:`write_model_card` writes them."""
    doc = card.to_json() if isinstance(card, ModelCard) else card
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"


def write_model_card(
    version_dir: str | os.PathLike[str], card: ModelCard | Mapping[str, Any]
) -> Path:
    """Validate and write the card (typed, or its JSON dict) into a (staging) version
    directory."""
    doc = card.to_json() if isinstance(card, ModelCard) else card
    validate_model_card(doc)
    path = Path(version_dir) / MODEL_CARD_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card_text(doc))
    return path
