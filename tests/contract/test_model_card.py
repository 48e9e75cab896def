"""The typed model card: cards written before it round-trip byte for byte, it is frozen,
it refuses what ``validate_model_card`` refuses (same messages), unknown keys survive."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contract import drift_scores
from contract.json_sections import FrozenMap, thaw
from contract.model_card import (
    MODEL_CARD_RELPATH,
    BnReference,
    ModelCard,
    ModelCardError,
    bn_reference_of,
    load_model_card,
    model_card_text,
    read_model_card,
    validate_model_card,
    write_model_card,
)
from contract.preprocessing import PreprocessSpec

DATA = Path(__file__).parent / "data"
#: Cards exported by the code before the typed card (commit df2380f): a tiny
#: classifier and a tiny detector trained by ``training`` and written by ``export_model``.
FIXTURES = ["model_card_v1_classifier.json", "model_card_v1_detector.json"]


def _doc(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


@pytest.fixture(params=FIXTURES)
def fixture_name(request) -> str:
    return request.param


@pytest.fixture
def doc(fixture_name) -> dict[str, Any]:
    return _doc(fixture_name)


# --- (a) cards written before the change -----------------------------------------


def test_a_card_written_before_round_trips_key_for_key(doc):
    card = ModelCard.from_json(doc)
    out = card.to_json()
    assert out == doc
    # Same types too (1 and 1.0 compare equal but are written differently), same order.
    assert json.dumps(out) == json.dumps(doc)


def test_a_card_written_before_round_trips_byte_for_byte(fixture_name, tmp_path):
    raw = (DATA / fixture_name).read_text()
    card = ModelCard.from_json(json.loads(raw))
    assert model_card_text(card) == raw
    path = write_model_card(tmp_path, card)
    assert path == tmp_path / MODEL_CARD_RELPATH
    assert path.read_text() == raw
    assert read_model_card(tmp_path) == card
    # The dict path writes the same bytes, and load_model_card still returns the dict.
    write_model_card(tmp_path / "dict", json.loads(raw))
    assert (tmp_path / "dict" / MODEL_CARD_RELPATH).read_text() == raw
    assert load_model_card(tmp_path) == json.loads(raw)


def test_typed_fields_hold_the_documents_values(doc):
    card = ModelCard.from_json(doc)
    assert card.schema_version == doc["schema_version"]
    assert (card.name, card.version, card.task) == (doc["name"], doc["version"], doc["task"])
    assert card.labels == tuple(doc["labels"])
    assert card.created_at == doc["created_at"]
    for key in ("height", "width", "channels", "dtype", "tensor"):
        assert getattr(card.input, key) == doc["input"][key]
    assert card.signature.name == doc["signature"]["name"]
    for name, info in doc["signature"]["outputs"].items():
        assert card.signature.outputs[name].dtype == info["dtype"]
        assert list(card.signature.outputs[name].shape) == info["shape"]
    assert card.preprocess_spec == PreprocessSpec.from_dict(doc["preprocessing"])
    ref = doc["bn_reference"]
    assert card.bn_reference.total_channels == ref["total_channels"]
    assert card.bn_reference.probe_names == [p["name"] for p in ref["probes"]]
    for probe, raw in zip(card.bn_reference.probes, ref["probes"], strict=True):
        assert (probe.name, probe.channels, probe.offset) == (
            raw["name"],
            raw["channels"],
            raw["offset"],
        )
        assert list(probe.moving_mean) == raw["moving_mean"]
        assert list(probe.moving_variance) == raw["moving_variance"]
        assert probe.epsilon == raw["epsilon"]
        assert probe.slice == slice(raw["offset"], raw["offset"] + raw["channels"])
    assert list(card.bn_reference.pixel_stats.mean) == ref["pixel_stats"]["mean"]
    assert card.bn_reference.drift.window == ref["drift"]["window"]
    assert card.metrics.parity.threshold == doc["metrics"]["parity"]["threshold"]
    assert card.metrics.parity.passed == doc["metrics"]["parity"]["passed"]
    assert card.metrics.staleness.passed == doc["metrics"]["staleness"]["passed"]
    assert card.calibration.temperature == doc["calibration"]["temperature"]
    assert card.calibration.method == doc["calibration"]["method"]
    assert card.lineage.parent_version == doc["lineage"]["parent_version"]
    assert thaw(card.lineage.parameters) == doc["lineage"]["parameters"]
    assert card.reference_set.file == doc["reference_set"]["file"]
    assert thaw(card.training) == doc["training"]
    if doc["task"] == "detection":
        det = doc["detection"]
        assert thaw(card.detection.anchors) == det["anchors"]
        assert thaw(card.detection.nms) == det["nms"]
        assert list(card.detection.box_variances) == det["box_variances"]
    else:
        assert card.detection is None


def test_drift_scores_read_the_typed_card_as_they_read_the_dict(doc):
    card = ModelCard.from_json(doc)
    typed, legacy = drift_scores.probe_references(card), drift_scores.probe_references(doc)
    assert [p.name for p in typed] == [p.name for p in legacy]
    for a, b in zip(typed, legacy, strict=True):
        assert (a.offset, a.channels, a.epsilon) == (b.offset, b.channels, b.epsilon)
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.variance, b.variance)
    thresholds = drift_scores.thresholds(card)
    assert thresholds == drift_scores.thresholds(doc)
    layers = doc["bn_reference"]["drift"]["layers"]
    assert thresholds == {
        layer: {s: v["threshold"] for s, v in by_score.items()}
        for layer, by_score in layers.items()
    }
    assert bn_reference_of(card) is card.bn_reference
    assert bn_reference_of({"bn_reference": {}}) == BnReference()


def test_a_changed_card_writes_the_change(doc):
    card = ModelCard.from_json(doc)
    calibration = dataclasses.replace(card.calibration, temperature=1.5)
    changed = dataclasses.replace(card, version=card.version + 1, calibration=calibration)
    out = changed.to_json()
    assert out["version"] == doc["version"] + 1
    assert out["calibration"] == {**doc["calibration"], "temperature": 1.5}
    assert {k: v for k, v in out.items() if k not in ("version", "calibration")} == {
        k: v for k, v in doc.items() if k not in ("version", "calibration")
    }
    assert card.to_json() == doc  # the original is untouched


# --- (b) frozen ----------------------------------------------------------------------

_ASSIGNMENTS: list[Callable[[ModelCard], None]] = [
    lambda c: setattr(c, "name", "other"),
    lambda c: setattr(c, "labels", ("a",)),
    lambda c: setattr(c.input, "height", 1),
    lambda c: setattr(c.calibration, "temperature", 2.0),
    lambda c: setattr(c.bn_reference, "probes", ()),
    lambda c: setattr(c.bn_reference.probes[0], "offset", 3),
    lambda c: setattr(c, "extra", {}),
]


@pytest.mark.parametrize("assign", _ASSIGNMENTS)
def test_the_card_is_frozen(doc, assign):
    card = ModelCard.from_json(doc)
    with pytest.raises(dataclasses.FrozenInstanceError):
        assign(card)
    assert card.to_json() == doc


def test_collections_in_the_card_are_read_only(doc):
    card = ModelCard.from_json(doc)
    assert isinstance(card.labels, tuple)
    assert isinstance(card.bn_reference.probes[0].moving_mean, tuple)
    for mapping in (card.preprocessing, card.lineage.parameters, card.training, card.extra):
        assert isinstance(mapping, FrozenMap)
        with pytest.raises(TypeError):
            mapping["x"] = 1  # type: ignore[index]
    # Nested JSON inside a mapping is frozen too; to_json gives plain lists and dicts back.
    assert isinstance(card.metrics.staleness.scores, FrozenMap)
    assert isinstance(card.bn_reference.pixel_stats.to_json()["mean"], list)
    assert type(card.to_json()["metrics"]["staleness"]["scores"]) is dict
    doc["labels"].append("mutated after parsing")
    assert "mutated after parsing" not in card.labels


def test_the_card_hashes_pickles_and_copies(doc):
    card = ModelCard.from_json(doc)
    assert hash(card) == hash(ModelCard.from_json(_doc_copy(doc)))
    assert pickle.loads(pickle.dumps(card)) == card
    assert copy.deepcopy(card).to_json() == doc


def _doc_copy(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(doc))


# --- (c) the validation failures of validate_model_card --------------------------


def _without(*keys: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for k in keys:
            del d[k]

    return edit


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return edit


def _del(path: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        del d[last]

    return edit


def _shorten_mean(d: dict) -> None:
    d["bn_reference"]["probes"][1]["moving_mean"].pop()


INVALID: dict[str, Callable[[dict], None]] = {
    "no preprocessing": _without("preprocessing"),
    "no name, labels and lineage": _without("name", "labels", "lineage"),
    "no version": _without("version"),
    "unknown task": _set("task", "segmentation"),
    "empty labels": _set("labels", []),
    "non-string label": _set("labels.0", 7),
    "float height": _set("input.height", 32.0),
    "no width": _del("input.width"),
    "string channels": _set("input.channels", "3"),
    "probe offset": _set("bn_reference.probes.1.offset", 0),
    "probe mean length": _shorten_mean,
    "total channels": _set("bn_reference.total_channels", 1),
    "no total channels": _del("bn_reference.total_channels"),
    "no temperature": _del("calibration.temperature"),
}


@pytest.mark.parametrize("edit", INVALID.values(), ids=list(INVALID))
def test_from_json_refuses_what_validate_refuses_with_the_same_message(doc, edit):
    edit(doc)
    with pytest.raises(ModelCardError) as expected:
        validate_model_card(doc)
    with pytest.raises(ModelCardError) as got:
        ModelCard.from_json(doc)
    assert str(got.value) == str(expected.value)


def test_a_card_with_a_missing_file_or_bad_json_is_refused(tmp_path):
    with pytest.raises(ModelCardError, match="no model card"):
        read_model_card(tmp_path)
    (tmp_path / MODEL_CARD_RELPATH).parent.mkdir(parents=True)
    (tmp_path / MODEL_CARD_RELPATH).write_text("{not json")
    with pytest.raises(ModelCardError, match="not JSON"):
        read_model_card(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("signature", ["not", "an", "object"]), "signature must be a JSON object"),
        (_set("bn_reference.probes.0", "probe"), "model card is malformed"),
        (_del("bn_reference.probes.0.epsilon"), r"bn_reference.probes\[0\] lacks \['epsilon'\]"),
        (_set("metrics", 3), "metrics must be a JSON object"),
        (_set("input", []), "model card is malformed"),
    ],
)
def test_malformed_sections_are_model_card_errors(doc, edit, message):
    edit(doc)
    with pytest.raises(ModelCardError, match=message):
        ModelCard.from_json(doc)


def test_writing_an_invalid_card_is_refused(doc, tmp_path):
    card = ModelCard.from_json(doc)
    bad = dataclasses.replace(card, task="segmentation")
    with pytest.raises(ModelCardError, match="task must be one of"):
        write_model_card(tmp_path, bad)
    assert not (tmp_path / MODEL_CARD_RELPATH).exists()


# --- (d) unknown keys survive ---------------------------------------------------------

UNKNOWN: dict[str, Callable[[dict], None]] = {
    "top level": _set("future_section", {"a": [1, 2.5, None], "b": {"c": True}}),
    "input": _set("input.layout", "NHWC"),
    "signature": _set("signature.method", "predict"),
    "signature output": _set("signature.outputs.bn_input_mean.note", "probe"),
    "bn_reference": _set("bn_reference.kind", "moving"),
    "probe": _set("bn_reference.probes.0.momentum", 0.99),
    "pixel_stats": _set("bn_reference.pixel_stats.median", [0.1, 0.2, 0.3]),
    "drift": _set("bn_reference.drift.method", "bootstrap"),
    "drift layer score": _set("bn_reference.drift.layers.new_layer", {"x": {"threshold": 1}}),
    "metrics": _set("metrics.latency_ms", 3),
    "parity": _set("metrics.parity.batches", 4),
    "calibration": _set("calibration.ece_after", 0.01),
    "lineage": _set("lineage.calibrated_from", {"version": 1, "samples": 300}),
    "reference_set": _set("reference_set.sha256", "00ff"),
    "preprocessing": _set("preprocessing.colour_space", "sRGB"),
    "explicit nulls": _set("lineage.code_revision", None),
}


@pytest.mark.parametrize("edit", UNKNOWN.values(), ids=list(UNKNOWN))
def test_unknown_keys_survive_a_round_trip(doc, edit, tmp_path):
    edit(doc)
    card = ModelCard.from_json(doc)
    assert card.to_json() == doc
    write_model_card(tmp_path, card)
    assert json.loads((tmp_path / MODEL_CARD_RELPATH).read_text()) == doc
    assert read_model_card(tmp_path).to_json() == doc


def test_unknown_keys_are_kept_in_extra(doc):
    doc["future_section"] = {"a": [1, 2]}
    doc["calibration"]["ece_after"] = 0.01
    doc["bn_reference"]["probes"][0]["momentum"] = 0.99
    card = ModelCard.from_json(doc)
    assert card.extra == {"future_section": {"a": (1, 2)}}
    assert card.calibration.extra["ece_after"] == 0.01
    assert card.bn_reference.probes[0].extra == {"momentum": 0.99}
    assert "future_section" not in ModelCard.from_json(_doc(FIXTURES[0])).extra


ABSENT = ["bn_reference.pixel_stats", "bn_reference.drift", "input.tensor", "metrics.parity"]


@pytest.mark.parametrize("path", ABSENT)
def test_absent_optional_keys_stay_absent(doc, path):
    _del(path)(doc)
    card = ModelCard.from_json(doc)
    assert card.to_json() == doc
    if path == "input.tensor":
        assert card.input.tensor == "images"  # the readers' default


def test_a_card_without_probes_or_optional_sections_round_trips(doc):
    for key in ("reference_set", "training", "detection"):
        doc.pop(key, None)
    doc["bn_reference"] = {"total_channels": 0}
    card = ModelCard.from_json(doc)
    assert card.bn_reference.probes == ()
    assert card.reference_set is None and card.training is None
    assert card.to_json() == doc
