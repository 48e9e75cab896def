"""The error table: statuses, gRPC codes, problem documents, and its coverage."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import grpc
import pytest
from werkzeug import exceptions as http

from calibration import capture_store, jobs
from contract.errors import DomainError
from contract.preprocessing import ImageDecodeError, ImageTooLargeError, UnusableImageError
from serving import errors
from serving.api import errors as table

REPO_ROOT = Path(__file__).resolve().parents[3]
#: Packages whose errors must name what went wrong, never a transport status.
DOMAIN_PACKAGES = ("contract", "training", "calibration")


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (errors.InvalidParameter, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unauthorized, 401, grpc.StatusCode.UNAUTHENTICATED),
        (errors.ModelNotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.VersionNotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.LabelNotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.MethodNotAllowed, 405, grpc.StatusCode.UNIMPLEMENTED),
        (errors.Conflict, 409, grpc.StatusCode.ALREADY_EXISTS),
        (errors.Gone, 410, grpc.StatusCode.NOT_FOUND),
        (errors.TooManyImages, 413, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.TooManyPixels, 413, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnsupportedMediaType, 415, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unprocessable, 422, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Overloaded, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ServingError, 500, grpc.StatusCode.INTERNAL),
        (errors.BackendError, 502, grpc.StatusCode.INTERNAL),
        (errors.BackendUnavailable, 502, grpc.StatusCode.UNAVAILABLE),
        (errors.ServiceUnavailable, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.QueueTimeout, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.PreprocessTimeout, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.BackendTimeout, 504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_status_table(cls, status, code):
    exc = cls("detail")
    assert table.http_status(exc) == status
    assert table.grpc_code(exc) == code
    assert table.problem_code(exc) == cls.code


def test_problem_document_fields():
    exc = errors.Overloaded("queue full", retry_after=2.0, extra={"queue": 5})
    doc = table.problem(exc, instance="/v1/classify", request_id="abc")
    assert doc == {
        "type": table.PROBLEM_TYPE_BASE + "overloaded",
        "title": "Too many requests",
        "status": 429,
        "detail": "queue full",
        "code": "overloaded",
        "instance": "/v1/classify",
        "request_id": "abc",
        "queue": 5,
    }
    assert table.retry_after(exc) == "2"
    assert table.retry_after(errors.Overloaded("x", retry_after=0.2)) == "1"
    assert table.retry_after(errors.BadRequest("x")) is None


@pytest.mark.parametrize(
    ("exc", "status", "code", "title"),
    [
        (ImageDecodeError("x"), 400, "undecodable_image", "Image could not be decoded"),
        (ImageTooLargeError("x"), 413, "image_too_large", "Image too large"),
        (UnusableImageError("x"), 422, "unusable_image", "Image cannot be used"),
    ],
)
def test_rejected_images_keep_their_status(exc, status, code, title):
    mapped = errors.ImageRejected(exc, index=2)
    assert table.http_status(mapped) == status == table.http_status(exc)
    assert table.grpc_code(mapped) == grpc.StatusCode.INVALID_ARGUMENT
    doc = table.problem(mapped)
    assert (doc["status"], doc["code"], doc["title"]) == (status, code, title)
    assert doc["detail"] == "image 2: x" and doc["image_index"] == 2
    assert "image_index" not in table.problem(errors.ImageRejected(exc))


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (capture_store.UnknownRequestError("id"), 404, "not_found"),
        (capture_store.ExpiredRequestError("id"), 410, "gone"),
        (capture_store.FeedbackConflictError("id"), 409, "conflict"),
        (capture_store.InvalidFeedbackError("bad"), 422, "unprocessable"),
        (capture_store.SampleStoreError("bad"), 422, "unprocessable"),
        (jobs.CalibrationBusy("running"), 409, "conflict"),
        (jobs.CoolingDown("too soon"), 409, "conflict"),
        (jobs.UnknownJob("j1"), 404, "not_found"),
    ],
)
def test_calibration_errors_read_as_the_gateways(exc, status, code):
    doc = table.problem(exc)
    assert (doc["status"], doc["code"]) == (status, code)
    assert doc["detail"] == str(exc)


def test_werkzeug_errors():
    assert table.problem(http.NotFound())["code"] == "not_found"
    too_large = table.problem(http.RequestEntityTooLarge())
    assert too_large["status"] == 413 and too_large["code"] == "payload_too_large"
    assert too_large["detail"] == "request body is larger than the limit"
    teapot = table.problem(http.ImATeapot())
    assert (teapot["status"], teapot["code"], teapot["title"]) == (
        418,
        "i'm_a_teapot",
        "I'm a teapot",
    )


def test_unmapped_exceptions_are_bugs():
    assert table.resolve(ValueError("x")) is None and table.resolve(KeyError("x")) is None
    assert table.http_status(RuntimeError("x")) == 500


def _import_all(package: str) -> None:
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        importlib.import_module(info.name)


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


@pytest.mark.parametrize("base", [DomainError, errors.ServingError], ids=lambda c: c.__name__)
def test_every_error_class_has_a_row(base):
    for package in ("contract", "calibration", "serving"):
        _import_all(package)
    classes = {base} | _subclasses(base)
    project = {c for c in classes if c.__module__.split(".")[0] in (*DOMAIN_PACKAGES, "serving")}
    unmapped = sorted(
        c.__qualname__ for c in project if c is not DomainError and table.entry_for(c) is None
    )
    assert not unmapped, f"error classes without a row in serving/api/errors.py: {unmapped}"


def _status_attributes(path: Path) -> list[str]:
    """``Class.status`` assignments in exception classes (bases named ...Error/...Exception)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [ast.unparse(b) for b in node.bases]
        if not any(b.endswith(("Error", "Exception")) for b in bases) and not node.name.endswith(
            "Error"
        ):
            continue
        for stmt in node.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else []
            targets += [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
            names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            if "status" in names or "grpc_code" in names:
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.name}")
    return found


def test_domain_packages_carry_no_transport_status():
    offenders = [
        hit
        for package in DOMAIN_PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for hit in _status_attributes(path)
    ]
    assert not offenders, f"exception classes with a transport status: {offenders}"
