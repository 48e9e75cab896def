"""``imgserve classify FILE...`` and ``imgserve detect FILE...``: call a running gateway.

All FILEs go in one request, over REST (``--url``) or gRPC (``--grpc``), under the
gateway's request id or ``--request-id``'s (what ``imgserve feedback`` refers to). The
answer is printed as a table under a line naming the model and the request, or as the
API's JSON document with ``--json``. Exit codes: 0
answered, 1 the server refused the request (4xx: a bad image or option), 2 a usage
error (bad flags, a FILE that cannot be read, an unusable ``--out``), 3 the server
failed or is overloaded (5xx, 429), 4 no server answered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgserve.annotate import OutputError, annotate, output_paths, save
from imgserve.client import ClientError, GrpcClient, Image, ImageClient, Options, RestClient

EXIT_USAGE = 2
DEFAULT_URL = "http://127.0.0.1:8080"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the gateway is (``--url`` or ``--grpc``), ``--json`` and ``--timeout``: the
    flags of every client command."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help=f"gateway REST base URL (default {DEFAULT_URL})")
    where.add_argument("--grpc", metavar="HOST:PORT", help="gateway gRPC address instead of REST")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds to wait for the answer (default 30)",
    )


def add_client_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """The flags both image commands take: the files, the server, which model, the output."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="image files to send")
    add_connection_arguments(parser)
    parser.add_argument("--model", help=f"model name (default: the gateway's {task} model)")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, metavar="N", help="model version")
    version.add_argument("--label", help="version label, e.g. stable or canary")
    parser.add_argument(
        "--score-threshold", type=float, metavar="S", help="drop results scoring below this (0..1)"
    )
    parser.add_argument(
        "--request-id",
        metavar="ID",
        help="the request's id (default: the gateway's), which 'imgserve feedback' refers to",
    )


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imgserve classify``."""
    add_client_arguments(parser, "classification")
    parser.add_argument("--top-k", type=int, metavar="K", help="classes per image (default 5)")
    parser.set_defaults(func=run_classify)


def add_detect_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imgserve detect``."""
    add_client_arguments(parser, "detection")
    parser.add_argument("--max-detections", type=int, metavar="N", help="most detections per image")
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="draw the boxes onto the images: with one FILE the file to write (format from "
        "the extension) or a directory; with several, a directory that gets <stem>.png each",
    )
    parser.set_defaults(func=run_detect)


def run_classify(args: argparse.Namespace) -> int:
    """Classify the FILEs; print the classes per image."""
    return _run(args, "classify", None)


def run_detect(args: argparse.Namespace) -> int:
    """Detect objects in the FILEs; print them, and draw them with ``--out``."""
    outputs = None
    if args.out:
        try:
            outputs = output_paths(args.files, args.out)
        except OutputError as exc:
            return _usage("detect", exc)
    return _run(args, "detect", outputs)


def _run(args: argparse.Namespace, call: str, outputs: list[Path] | None) -> int:
    try:
        images = [Image(Path(f).name, Path(f).read_bytes()) for f in args.files]
    except OSError as exc:
        return _usage(call, f"cannot read {exc.filename}: {exc.strerror}")
    options = Options(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(Options)})
    client = connect(args)
    try:
        answer = getattr(client, call)(images, options, args.request_id)
    except ClientError as exc:
        which = exc.image_index
        named = f" (FILE {args.files[which]})" if which is not None and which < len(images) else ""
        print(f"imgserve {call}: error: {exc}{named}", file=sys.stderr)
        return exc.exit_code
    finally:
        client.close()
    if args.json:
        print(json.dumps(answer, indent=1))
    elif call == "classify":
        print(classify_table(args.files, answer))
    else:
        print(detect_table(args.files, answer))
    if outputs is not None:
        try:
            _write_annotated(images, answer, outputs)
        except OSError as exc:
            return _usage(call, f"cannot write {exc.filename}: {exc.strerror}")
    return 0


def connect(args: argparse.Namespace) -> ImageClient:
    """The client ``--grpc`` or ``--url`` (default :data:`DEFAULT_URL`) asks for."""
    if args.grpc:
        return GrpcClient(args.grpc, args.timeout)
    return RestClient(args.url or DEFAULT_URL, args.timeout)


def _write_annotated(images: list[Image], answer: dict[str, Any], outputs: list[Path]) -> None:
    for image, prediction, path in zip(images, answer["predictions"], outputs, strict=True):
        save(annotate(image.data, prediction["detections"]), path)
        print(f"wrote {path}", file=sys.stderr)


def _usage(call: str, message: object) -> int:
    print(f"imgserve {call}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def model_line(answer: dict[str, Any]) -> str:
    """``model NAME version V (labels); request ID`` of an answer."""
    model = answer["model"]
    labels = f" ({', '.join(model['labels'])})" if model.get("labels") else ""
    request = f"; request {answer['request_id']}" if answer.get("request_id") else ""
    return f"model {model['name']} version {model['version']}{labels}{request}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, under a header row."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def classify_table(files: Sequence[str], answer: dict[str, Any]) -> str:
    """One row per class of each image, best first."""
    rows = []
    for f, prediction in zip(files, answer["predictions"], strict=True):
        rows += [
            [f, str(rank), c["label"], f"{c['score']:.4f}"]
            for rank, c in enumerate(prediction["classes"], 1)
        ] or [[f, "-", "(none)", ""]]
    return model_line(answer) + "\n" + table(["FILE", "RANK", "LABEL", "SCORE"], rows)


def detect_table(files: Sequence[str], answer: dict[str, Any]) -> str:
    """One row per detection of each image; boxes in the image's pixels."""
    rows = []
    for f, prediction in zip(files, answer["predictions"], strict=True):
        rows += [
            [f, d["label"], f"{d['score']:.4f}"]
            + [f"{d['box'][k]:.1f}" for k in ("xmin", "ymin", "xmax", "ymax")]
            for d in prediction["detections"]
        ] or [[f, "(none)", "", "", "", "", ""]]
    headers = ["FILE", "LABEL", "SCORE", "XMIN", "YMIN", "XMAX", "YMAX"]
    return model_line(answer) + "\n" + table(headers, rows)
