"""Clients of the gateway's own API, over REST (``POST /v1/classify``, ``/v1/detect``,
``/v1/feedback``) or gRPC (``imgserve.v1.ImageService``), both answering in the REST
API's JSON shape.

A failure is one of three :class:`ClientError` kinds, each with its exit code: the
server refused the request (4xx: the input or the options are wrong), the server
failed or is overloaded (5xx, 429), or no server answered at all.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import requests

from serving.proto import imgserve_pb2, imgserve_pb2_grpc

EXIT_REFUSED = 1
EXIT_BAD_ADDRESS = 2
EXIT_SERVER_FAILED = 3
EXIT_UNREACHABLE = 4


class ClientError(Exception):
    """A call that gave no answer; ``exit_code`` says whose fault it is."""

    exit_code = EXIT_SERVER_FAILED

    def __init__(self, message: str, image_index: int | None = None) -> None:
        super().__init__(message)
        #: Which image of the request the server refused, where it said so.
        self.image_index = image_index


class RequestRefused(ClientError):
    """The server refused the request (a 4xx problem): fix the input or the options."""

    exit_code = EXIT_REFUSED


class BadAddress(ClientError):
    """The server's address is not one a request can be sent to (a usage error)."""

    exit_code = EXIT_BAD_ADDRESS


class ServerFailed(ClientError):
    """The server answered with a failure (5xx) or shed the request (429)."""

    exit_code = EXIT_SERVER_FAILED


class ServerUnreachable(ClientError):
    """No server answered: nothing listens there, the name does not resolve, or it timed out."""

    exit_code = EXIT_UNREACHABLE


def error_for_status(status: int, message: str, image_index: int | None = None) -> ClientError:
    """The error kind of an HTTP status: 4xx other than 429 is the client's fault."""
    if 400 <= status < 500 and status != 429:
        return RequestRefused(message, image_index)
    return ServerFailed(message, image_index)


@dataclass(frozen=True)
class Image:
    """One encoded image to send, and the name it came from."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Options:
    """What a call asks for beside the images; None leaves the server's default."""

    model: str | None = None
    version: int | None = None
    label: str | None = None
    top_k: int | None = None
    score_threshold: float | None = None
    max_detections: int | None = None

    def fields(self) -> dict[str, Any]:
        """The options that are set, by the API's parameter names."""
        return {k: v for k, v in vars(self).items() if v is not None}


class ImageClient(Protocol):
    """A gateway connection; each call returns the REST API's JSON document.

    ``request_id`` (None: the gateway makes one) names the request, which is what
    feedback refers to.
    """

    def classify(
        self, images: list[Image], options: Options, request_id: str | None = None
    ) -> dict[str, Any]: ...

    def detect(
        self, images: list[Image], options: Options, request_id: str | None = None
    ) -> dict[str, Any]: ...

    def feedback(
        self, request_id: str, *, labels: Any = None, objects: Any = None, model: str | None = None
    ) -> dict[str, Any]: ...

    def close(self) -> None: ...


class RestClient:
    """``POST /v1/classify`` and ``/v1/detect`` with the images as multipart ``image`` fields."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def close(self) -> None:
        """Close the connection pool."""
        self.session.close()

    def classify(
        self, images: list[Image], options: Options, request_id: str | None = None
    ) -> dict[str, Any]:
        return self._predict("/v1/classify", images, options, request_id)

    def detect(
        self, images: list[Image], options: Options, request_id: str | None = None
    ) -> dict[str, Any]:
        return self._predict("/v1/detect", images, options, request_id)

    def feedback(
        self, request_id: str, *, labels: Any = None, objects: Any = None, model: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/feedback``: 201 recorded, 200 the same feedback again."""
        body = {"request_id": request_id, "labels": labels, "objects": objects, "model": model}
        body = {k: v for k, v in body.items() if v is not None}
        return self._post("/v1/feedback", json=body)

    def _predict(
        self, path: str, images: list[Image], options: Options, request_id: str | None
    ) -> dict[str, Any]:
        files = [("image", (image.name, image.data, _media_type(image.name))) for image in images]
        headers = {"X-Request-ID": request_id} if request_id else {}
        return self._post(path, files=files, data=options.fields(), headers=headers)

    def _post(self, path: str, **kw: Any) -> dict[str, Any]:
        try:
            response = self.session.post(self.url + path, timeout=self.timeout, **kw)
        except (
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidURL,
        ) as exc:
            raise BadAddress(f"--url {self.url!r} is not an http(s) URL: {exc}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ServerUnreachable(f"no answer from {self.url}: {_reason(exc)}") from None
        if response.status_code not in (200, 201):
            raise error_for_status(
                response.status_code, problem_message(response), _image_index(response)
            )
        try:
            return response.json()
        except ValueError:  # something other than the gateway answered at that URL
            raise ServerFailed(
                f"{self.url + path} answered 200 with no JSON document: is it an imgserve gateway?"
            ) from None


def _media_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _reason(exc: requests.RequestException) -> str:
    # requests wraps urllib3's error, whose ``reason`` is the clear part
    # ("Failed to establish a new connection: [Errno 111] Connection refused").
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return str(reason or exc)


def _image_index(response: requests.Response) -> int | None:
    try:
        index = response.json().get("image_index")
    except (ValueError, AttributeError):
        return None
    return index if isinstance(index, int) else None


def problem_message(response: requests.Response) -> str:
    """``"<title> (<status>): <detail>"`` from a problem document, else the status and body."""
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "title" in doc:
        message = f"{doc['title']} ({response.status_code})"
        if doc.get("detail"):
            message += f": {doc['detail']}"
        if response.headers.get("Retry-After"):
            message += f" (retry after {response.headers['Retry-After']} s)"
        return message
    # Not the gateway's problem document: the status says enough, and a page of HTML
    # says nothing on a terminal; a short text body is kept, on one line.
    html = "html" in response.headers.get("Content-Type", "")
    body = "" if html else " ".join(response.text.split())[:200]
    return f"HTTP {response.status_code} {response.reason}" + (f": {body}" if body else "")


class GrpcClient:
    """``imgserve.v1.ImageService`` at ``host:port`` (plaintext, as the gateway serves it)."""

    def __init__(self, target: str, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target)
        self.stub = imgserve_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def classify(
        self, images: list[Image], options: Options, request_id: str | None = None
    ) -> dict[str, Any]:
        request = imgserve_pb2.ClassifyRequest(
            model=_selector(options),
            images=[image.data for image in images],
            top_k=options.top_k,
            score_threshold=options.score_threshold,
        )
        response = self._call(self.stub.Classify, request, request_id)
        return {
            "request_id": response.request_id,
            "model": _model_json(response.model),
            "predictions": [
                {"classes": [_score_json(c) for c in p.classes]} for p in response.predictions
            ],
        }

    def detect(
        self, images: list[Image], options: Options, request_id: str | None = None
    ) -> dict[str, Any]:
        request = imgserve_pb2.DetectRequest(
            model=_selector(options),
            images=[image.data for image in images],
            score_threshold=options.score_threshold,
            max_detections=options.max_detections,
        )
        response = self._call(self.stub.Detect, request, request_id)
        return {
            "request_id": response.request_id,
            "model": _model_json(response.model),
            "predictions": [
                {
                    "width": p.width,
                    "height": p.height,
                    "detections": [
                        {
                            **_score_json(d),
                            "box": {k: getattr(d.box, k) for k in BOX_KEYS},
                        }
                        for d in p.detections
                    ],
                }
                for p in response.predictions
            ],
        }

    def feedback(
        self, request_id: str, *, labels: Any = None, objects: Any = None, model: str | None = None
    ) -> dict[str, Any]:
        """``ImageService/Feedback``, answered in the REST API's JSON shape."""
        request = imgserve_pb2.FeedbackRequest(request_id=request_id, model=model or "")
        if labels is not None:
            request.labels.labels.extend(_true_label(lab, "labels") for lab in labels)
        if objects is not None:
            if not isinstance(objects, list) or not all(isinstance(o, list) for o in objects):
                raise RequestRefused("objects must be one list of objects per image")
            for i, image in enumerate(objects):
                entry = request.objects.images.add()
                for j, obj in enumerate(image):
                    where = f"objects[{i}][{j}]"
                    if not isinstance(obj, dict):
                        raise RequestRefused(f"{where} must be an object with 'label' and 'box'")
                    entry.objects.add(
                        label=_true_label(obj.get("label"), where), box=_box(obj.get("box"), where)
                    )
        response = self._call(self.stub.Feedback, request)
        answer: dict[str, Any] = {"request_id": response.request_id, "model": response.model}
        if response.WhichOneof("truth") == "objects":
            answer["objects"] = [
                [
                    {
                        "label": o.label.name,
                        "box": [getattr(o.box, k) for k in BOX_KEYS],
                        "input_box": [getattr(o.input_box, k) for k in BOX_KEYS],
                    }
                    for o in image.objects
                ]
                for image in response.objects.images
            ]
        else:
            answer["labels"] = [
                getattr(lab, lab.WhichOneof("value") or "name") for lab in response.labels.labels
            ]
        answer["created"] = response.created
        return answer

    def _call(self, method: Any, request: Any, request_id: str | None = None) -> Any:
        metadata = (("x-request-id", request_id),) if request_id else None
        try:
            return method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc, self.target) from None


BOX_KEYS = ("ymin", "xmin", "ymax", "xmax")


def _selector(options: Options) -> imgserve_pb2.ModelSelector:
    return imgserve_pb2.ModelSelector(
        name=options.model or "", version=options.version, label=options.label
    )


def _true_label(value: Any, where: str) -> imgserve_pb2.TrueLabel:
    """A class name or index as the message field; a request the gateway would refuse otherwise."""
    if isinstance(value, str):
        return imgserve_pb2.TrueLabel(name=value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return imgserve_pb2.TrueLabel(index=value)
    raise RequestRefused(f"{where}: a label must be a class name or index, got {value!r}")


def _box(value: Any, where: str) -> imgserve_pb2.Box:
    """``[ymin, xmin, ymax, xmax]`` or the detect answer's box object, as the message."""
    if isinstance(value, dict) and set(value) >= set(BOX_KEYS):
        value = [value[k] for k in BOX_KEYS]
    numbers = isinstance(value, list) and len(value) == 4
    if not numbers or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise RequestRefused(
            f"{where}.box must be 4 numbers [ymin, xmin, ymax, xmax], got {value!r}"
        )
    return imgserve_pb2.Box(**dict(zip(BOX_KEYS, (float(v) for v in value), strict=True)))


def _model_json(ref: imgserve_pb2.ModelRef) -> dict[str, Any]:
    return {"name": ref.name, "version": ref.version, "labels": list(ref.labels)}


def _score_json(item: Any) -> dict[str, Any]:
    return {"label": item.label, "index": item.index, "score": item.score}


def grpc_error(exc: grpc.RpcError, target: str) -> ClientError:
    """The error kind of a failed call, from the gateway's ``http-status`` trailer.

    The gateway sends the problem's HTTP status and code with every error it
    raises; a call without them never reached it (UNAVAILABLE: nothing listening).
    """
    trailers = dict(exc.trailing_metadata() or ())
    detail = exc.details() or exc.code().name
    status = trailers.get("http-status")
    if status is None:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ServerUnreachable(f"no answer from {target}: {detail}")
        return ServerFailed(f"{exc.code().name}: {detail}")
    message = f"{trailers.get('problem-code', exc.code().name)} ({status}): {detail}"
    if trailers.get("retry-after"):
        message += f" (retry after {trailers['retry-after']} s)"
    return error_for_status(int(status), message)
