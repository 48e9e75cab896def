"""TF Serving's request and answer bodies, without a server."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from serving.api.rest.tfserving_codec import (
    COLUMNAR,
    ROW,
    classify_json,
    parse_classify,
    parse_predict,
    predict_json,
)
from serving.errors import BadRequest, TooManyImages
from serving.service import ClassifyResult, LabelScore, ModelRef

PNG, JPEG = b"\x89PNG fake", b"\xff\xd8 fake"


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def body(doc) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("doc", "fmt"),
    [
        ({"instances": [b64(PNG), b64(JPEG)]}, ROW),
        ({"instances": [{"images": b64(PNG)}, {"images": b64(JPEG)}]}, ROW),
        ({"signature_name": "serving_default", "inputs": [b64(PNG), b64(JPEG)]}, COLUMNAR),
        ({"signature_name": "", "inputs": {"images": [b64(PNG), b64(JPEG)]}}, COLUMNAR),
    ],
)
def test_predict_bodies_in_both_formats(doc, fmt):
    assert parse_predict(body(doc), 8) == ([PNG, JPEG], fmt)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "Missing 'inputs' or 'instances' key"),
        ({"instances": [b64(PNG)], "inputs": [b64(PNG)]}, "Missing 'inputs' or 'instances'"),
        ({"instances": []}, "No values in 'instances' array"),
        ({"inputs": {"images": []}}, "No values in 'inputs' array"),
        ({"instances": b64(PNG)}, "Expecting 'instances' to be a list"),
        ({"instances": [[0.5, 0.5]]}, "instances[0] must be an encoded image"),
        ({"instances": [{"b64": "@@@"}]}, "instances[0]: Unable to base64 decode"),
        ({"instances": [{"image": b64(PNG)}]}, "instances[0] must be an encoded image"),
        ({"instances": [b64(PNG)], "model": "x"}, "unknown keys ['model']"),
        ({"signature_name": "other", "instances": [b64(PNG)]}, 'name: "other" not found'),
        ({"signature_name": 1, "instances": [b64(PNG)]}, "must be a string value"),
        ([b64(PNG)], "not an object"),
    ],
)
def test_bad_predict_bodies_say_what_is_wrong(doc, message):
    with pytest.raises(BadRequest) as err:
        parse_predict(body(doc), 8)
    assert message in err.value.detail


def test_empty_and_malformed_bodies_are_bad_requests():
    with pytest.raises(BadRequest, match="document is empty"):
        parse_predict(b"", 8)
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_predict(b'{"instances": [', 8)


def test_image_count_is_bounded():
    with pytest.raises(TooManyImages):
        parse_predict(body({"instances": [b64(PNG)] * 3}), 2)
    with pytest.raises(TooManyImages):
        parse_classify(body({"examples": [{"image": b64(PNG)}] * 3}), 2)


def test_classify_bodies():
    doc = {"signature_name": "serving_default", "examples": [{"image": b64(PNG)}]}
    assert parse_classify(body(doc), 8) == [PNG]
    for bad, message in [
        ({"signature_name": "serving_default"}, "key 'examples' is expected"),
        ({"instances": [b64(PNG)]}, "unknown keys ['instances']"),
        ({"examples": []}, "No values in 'examples' array"),
        ({"examples": [{"image": b64(PNG), "caption": "x"}]}, "examples[0] must be"),
        ({"examples": [{"image": {"b64": "@"}}]}, "examples[0].image: Unable to base64"),
        ({"examples": [{"image": b64(PNG)}], "context": {}}, "unknown keys ['context']"),
    ]:
        with pytest.raises(BadRequest) as err:
            parse_classify(body(bad), 8)
        assert message in err.value.detail


def test_predict_answers_one_entry_per_image_keyed_by_output():
    outputs = {"probabilities": np.array([[0.25, 0.75], [1.0, 0.0]]), "logits": np.zeros((2, 2))}
    assert predict_json(outputs, ROW) == {
        "predictions": [
            {"logits": [0.0, 0.0], "probabilities": [0.25, 0.75]},
            {"logits": [0.0, 0.0], "probabilities": [1.0, 0.0]},
        ]
    }
    assert predict_json(outputs, COLUMNAR) == {
        "outputs": {"logits": [[0.0, 0.0], [0.0, 0.0]], "probabilities": [[0.25, 0.75], [1.0, 0.0]]}
    }


def test_a_single_output_is_answered_bare_as_tf_serving_does():
    outputs = {"scores": np.array([[0.5], [0.25]])}
    assert predict_json(outputs, ROW) == {"predictions": [[0.5], [0.25]]}
    assert predict_json(outputs, COLUMNAR) == {"outputs": [[0.5], [0.25]]}


def test_classify_answers_label_score_pairs_under_results():
    result = ClassifyResult(
        "rid",
        ModelRef("m", 1, []),
        [[LabelScore("cat", 1, 0.75), LabelScore("dog", 0, 0.25)], [LabelScore("dog", 0, 1.0)]],
    )
    assert classify_json(result) == {"results": [[["cat", 0.75], ["dog", 0.25]], [["dog", 1.0]]]}
