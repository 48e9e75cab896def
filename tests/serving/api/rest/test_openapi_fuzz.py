"""The REST API fuzzed from its own OpenAPI document (Schemathesis) against real gunicorn.

Every documented operation gets generated requests, valid by the document (positive)
and breaking it (negative: wrong types, missing fields, stray values), sent over
loopback to gunicorn serving the tiny models. Each response must be documented
for its operation (status code, content type, headers) and match its schema, and
none may be a server error. ``image/*`` bodies are drawn from real encoded images
(every mode and container the decoder handles, small generated ones, truncated
ones and plain bytes), so successful predictions are fuzzed too, not only refusals.
"""

from __future__ import annotations

import base64
import io
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks

from serving.api.rest.ops import OPENAPI_PATH
from tests.helpers.photos import sample_image_bytes
from tests.helpers.servers import gunicorn, stop

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "fuzz-admin-token"
#: Generated requests per operation and generation mode; about 25 s for the whole API.
EXAMPLES = 40
#: A client deadline this short may pass before the first decode: the documented answer is
#: then 503 (``preprocess_timeout``/``queue_timeout``, with Retry-After), not a server fault.
SHORT_DEADLINE_S = 0.05

PHOTOS = list(sample_image_bytes().values())


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """Image bytes as clients send them: real files, small generated ones, cut or garbage."""
    kind = draw(st.sampled_from(["photo", "generated", "truncated", "bytes"]))
    if kind == "photo":
        return draw(st.sampled_from(PHOTOS))
    if kind == "truncated":
        data = draw(st.sampled_from(PHOTOS))
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
    fmt = draw(
        st.sampled_from(["PNG", "GIF", "BMP", "WEBP"] + (["JPEG"] if mode in "RGBL" else []))
    )
    img = Image.new(mode, size, draw(st.integers(0, 255)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# Raw ``image/*`` bodies: the document says "any image", which Schemathesis cannot draw.
schemathesis.openapi.media_type("image/*", encoded_images(), aliases=["application/octet-stream"])
load_all_checks()

SCHEMA = schemathesis.openapi.from_path(OPENAPI_PATH).exclude(
    # Starting a calibration runs a real job (a training process over captured samples):
    # minutes of CPU per accepted request, and nothing a fuzzer's input changes about it.
    # Its validation is covered by tests/serving/api/rest/test_calibration.py.
    method="POST",
    path="/v1/admin/calibrations",
)
OPERATIONS = {op.ok().label: op.ok() for op in SCHEMA.get_all_operations()}


def short_client_deadline(case) -> bool:
    try:
        return float((case.headers or {}).get("X-Request-Timeout", "inf")) < SHORT_DEADLINE_S
    except ValueError:
        return False


def not_a_server_error(ctx, response, case) -> None:
    """No 5xx, except the documented 503 for a client's own deadline too short to decode in."""
    if response.status_code < 500:
        return
    try:
        code = response.json().get("code")
    except (ValueError, AttributeError):  # not a problem document
        code = None
    if (
        response.status_code == 503
        and short_client_deadline(case)
        and code in ("preprocess_timeout", "queue_timeout")
        and response.headers.get("retry-after")
    ):
        return
    raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")


CHECKS = [
    not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def gateway(serving_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """gunicorn with the admin API and the capture store on, so those routes answer too."""
    tmp = tmp_path_factory.mktemp("fuzz")
    proc, url, _ = gunicorn(
        serving_repo,
        tmp,
        workers="1",
        admin_token=ADMIN_TOKEN,
        capture_dir=str(tmp / "capture"),
        capture_rate="1",
    )
    yield url
    stop(proc)


#: label -> status -> count, over the module, for the summary line.
SEEN: dict[str, Counter] = defaultdict(Counter)


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_operation_answers_as_documented(gateway: str, label: str):
    operation = OPERATIONS[label]
    modes = [GenerationMode.POSITIVE]
    if operation.body or list(operation.iter_parameters()):
        modes.append(GenerationMode.NEGATIVE)  # nothing to break in a bare GET
    for mode in modes:
        # No shrinking: each step is a request to a real server, and the unshrunk
        # failing case (printed with its curl command) is enough to reproduce it.
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            response = case.call(
                base_url=gateway, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=15
            )
            SEEN[label][response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        try:
            fuzz()
        except Unsatisfiable:
            # Negative mode on an operation whose only input is a free string (a path
            # name): every value is valid, so there is nothing to break.
            if mode is GenerationMode.POSITIVE:
                raise
    print(f"{label}: {sum(SEEN[label].values())} requests, statuses {dict(SEEN[label])}")
    assert SEEN[label]


def bodies(data: bytes) -> list[tuple[str, object]]:
    """One image in each documented body form: (media type, body)."""
    return [
        ("application/octet-stream", data),
        ("multipart/form-data", {"image": [data]}),
        ("application/json", {"instances": [{"b64": base64.b64encode(data).decode()}]}),
    ]


@pytest.mark.parametrize("label", ["POST /v1/classify", "POST /v1/detect"])
def test_every_image_form_is_served_as_documented(gateway: str, label: str):
    # The fuzz mostly meets refusals; these are the answers a well-formed request gets.
    operation = OPERATIONS[label]
    statuses = Counter()
    for data in PHOTOS:
        for media_type, body in bodies(data):
            case = operation.Case(media_type=media_type, body=body)
            response = case.call(base_url=gateway, timeout=15)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS)
    assert statuses == {200: 3 * len(PHOTOS)}, statuses
