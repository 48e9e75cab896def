"""Versioned SavedModel export: the signature contract, model card, warmup, config.

``export_model`` is the one exporter for every task. It wraps a functional Keras
model (preprocessed images in, raw head outputs out) into a ``serving_default``
signature whose outputs are the task's ``postprocess`` outputs plus the probe
statistics ``bn_input_mean`` / ``bn_input_sqmean``, writes the SavedModel, model
card and TF Serving warmup records into a staging directory, renames it to the
next version number and points the version labels at it in ``models.config``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contract import drift_scores
from contract.bn import probe_layers, probe_moments, probe_reference
from contract.model_card import (
    KERAS_MODEL_RELPATH,
    SCHEMA_VERSION,
    WARMUP_RELPATH,
    ModelCard,
    write_model_card,
)
from contract.preprocessing import PreprocessSpec
from contract.repository import ModelRepository

SIGNATURE = "serving_default"
INPUT_NAME = "images"

Postprocess = Callable[[list[tf.Tensor]], dict[str, tf.Tensor]]


class ExportRefused(RuntimeError):
    """A gate refused the export; ``summary`` holds the run's figures when a trainer set them."""

    summary: dict | None = None


class StalenessError(ExportRefused):
    """The training data itself looks drifted against the stored BN statistics."""


@dataclass
class ExportResult:
    """The published version: its directory, number and model card.

    ``card`` is the card's JSON document (for readers not yet converted to the typed
    card); ``model_card`` the same card as a :class:`ModelCard`.
    """

    path: Path
    version: int
    card: dict[str, Any]
    model_card: ModelCard


def merge_sections(card: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """``card`` with ``fields`` over it: a section (dict) given in both is merged one
    level deep (the field's keys win), anything else is replaced."""
    merged = dict(card)
    for key, value in fields.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = {**current, **value}
        else:
            merged[key] = value
    return merged


class ServingModule(tf.Module):
    """The exported graph: preprocessed images -> task outputs + probe statistics."""

    def __init__(self, model: keras.Model, probe_names: list[str], postprocess: Postprocess):
        super().__init__()
        layers = probe_layers(model, probe_names)
        self._n_outputs = len(model.outputs)
        # One forward pass yields both the head outputs and the probe inputs.
        self.features = keras.Model(
            model.input, list(model.outputs) + [lyr.input for lyr in layers]
        )
        self._postprocess = postprocess
        shape = [None, *model.inputs[0].shape[1:]]
        self.serve = tf.function(
            self._serve, input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)]
        )

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        outs = self.features(images, training=False)
        outs = list(outs) if isinstance(outs, list | tuple) else [outs]
        result = dict(self._postprocess(outs[: self._n_outputs]))
        mean, sqmean = probe_moments(outs[self._n_outputs :])
        result["bn_input_mean"] = mean
        result["bn_input_sqmean"] = sqmean
        return result


def code_revision() -> str:
    """The git commit of the code that exported (``unknown`` outside a checkout)."""
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def pixel_statistics(images: np.ndarray) -> dict[str, Any]:
    """Per-channel mean/variance of preprocessed images (model-input space)."""
    x = np.asarray(images, dtype=np.float64).reshape(-1, images.shape[-1])
    return {
        "space": "model_input",
        "mean": [float(v) for v in x.mean(0)],
        "variance": [float(v) for v in x.var(0)],
        "images": int(images.shape[0]),
    }


def write_warmup(path: Path, name: str, images: np.ndarray, batch_sizes: Sequence[int]) -> None:
    """TF Serving warmup records: PredictionLogs it replays when it loads the version."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for bs in batch_sizes:
            batch = np.resize(images, (bs, *images.shape[1:])).astype(np.float32)
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=name, signature_name=SIGNATURE)
            )
            request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(batch))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def probe_outputs(
    module: ServingModule, images: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``bn_input_mean``/``bn_input_sqmean`` from the exported graph itself."""
    means, sqmeans = [], []
    for i in range(0, len(images), batch_size):
        out = module.serve(tf.constant(images[i : i + batch_size], tf.float32))
        means.append(out["bn_input_mean"].numpy())
        sqmeans.append(out["bn_input_sqmean"].numpy())
    return np.concatenate(means), np.concatenate(sqmeans)


def drift_reference(
    module: ServingModule,
    probes: list[dict[str, Any]],
    held_out: np.ndarray,
    training: np.ndarray | None,
    *,
    window: int = drift_scores.DEFAULT_WINDOW,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Reference quantiles of drift scores on held-out data, and the staleness check."""
    refs = drift_scores.probe_references({"bn_reference": {"probes": probes}})
    hm, hs = probe_outputs(module, held_out)
    reference = drift_scores.reference_quantiles(hm, hs, refs, window=window)
    report = None
    if training is not None:
        tm, ts = probe_outputs(module, training)
        report = drift_scores.staleness(tm, ts, refs)
    return reference, report


def _signature_description(module: ServingModule) -> dict[str, Any]:
    concrete = module.serve.get_concrete_function()
    outputs = {
        k: {"dtype": v.dtype.name, "shape": [-1 if d is None else int(d) for d in v.shape]}
        for k, v in concrete.structured_outputs.items()
    }
    spec = concrete.structured_input_signature[0][0]
    inputs = {
        INPUT_NAME: {"dtype": "float32", "shape": [-1 if d is None else int(d) for d in spec.shape]}
    }
    return {"name": SIGNATURE, "inputs": inputs, "outputs": outputs}


def export_model(
    model: keras.Model,
    *,
    model_base: str | os.PathLike[str],
    name: str,
    task: str,
    spec: PreprocessSpec,
    labels: list[str],
    postprocess: Postprocess,
    probe_layers: list[str],
    card_fields: dict[str, Any],
    warmup_images: np.ndarray,
    version_labels: Sequence[str] = ("stable",),
    extra_files: dict[str, bytes] | None = None,
    drift_images: np.ndarray | None = None,
    staleness_images: np.ndarray | None = None,
    drift_window: int = drift_scores.DEFAULT_WINDOW,
    force: bool = False,
) -> ExportResult:
    """Export ``model`` as the next version of ``name`` in ``model_base``.

    ``card_fields`` is merged into the card (``metrics``, ``lineage``,
    ``calibration``, task extras); ``bn_reference.pixel_stats`` should be given
    there, the probe part is filled in from the model. ``extra_files`` are written
    under ``assets.extra/`` (e.g. a labelled reference set). ``version_labels``
    are pointed at the new version in ``models.config`` (empty: publish only), in
    two writes that wait for the version to be AVAILABLE when the environment names
    a TF Serving (see :mod:`contract.repository`).

    ``drift_images`` (held-out, preprocessed) calibrate the drift alarm: the
    score quantiles over windows of ``drift_window`` images go to
    ``bn_reference.drift``. ``staleness_images`` (training data) must then score
    below the alarm threshold, else :class:`StalenessError` unless ``force``.
    """
    repo = ModelRepository(model_base)
    module = ServingModule(model, probe_layers, postprocess)
    probes = probe_reference(model, probe_layers)
    bn_fields: dict[str, Any] = {
        "probes": probes,
        "total_channels": sum(p["channels"] for p in probes),
    }
    derived: dict[str, Any] = {"bn_reference": bn_fields}
    if drift_images is not None:
        reference, stale = drift_reference(
            module, probes, drift_images, staleness_images, window=drift_window
        )
        bn_fields["drift"] = reference
        if stale is not None:
            derived["metrics"] = {"staleness": stale}
            if not stale["passed"] and not force:
                raise StalenessError(
                    "the training data's own drift score exceeds the staleness limits "
                    f"({'; '.join(stale['failures'])}): the stored BN statistics do not "
                    "describe the training data. Not exported (force to export anyway)."
                )
    base: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "task": task,
        "labels": list(labels),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "input": {
            "height": spec.height,
            "width": spec.width,
            "channels": spec.channels,
            "dtype": "float32",
            "tensor": INPUT_NAME,
        },
        "signature": _signature_description(module),
        "preprocessing": spec.to_dict(),
        "calibration": {"temperature": 1.0, "method": "none"},
        "metrics": {},
        "lineage": {"parent_version": None, "code_revision": code_revision()},
    }
    # The trainer's sections, then what was measured on the model, go over the defaults.
    document = merge_sections(merge_sections(base, card_fields), derived)

    with repo.lock():
        staging = repo.staging_dir(name)
        try:
            version = repo.next_version(name)
            # Validated before anything is written: a bad card_fields entry fails here.
            card = ModelCard.from_json({**document, "version": version})
            tf.saved_model.save(module, str(staging), signatures={SIGNATURE: module.serve})
            write_model_card(staging, card)
            # The Keras model travels with the version: calibration re-estimates its BN
            # statistics and exports the result as the next version.
            model.save(staging / KERAS_MODEL_RELPATH)
            write_warmup(staging / WARMUP_RELPATH, name, warmup_images, batch_sizes=(1, 8))
            for rel, data in (extra_files or {}).items():
                target = staging / "assets.extra" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            version = repo.publish(name, staging, version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if version_labels:
            # Two writes, as TF Serving's label rule needs: serve the version, wait
            # until the repository's readiness check reports it AVAILABLE, move labels.
            repo.set_labels(name, {label: version for label in version_labels})
    return ExportResult(repo.version_dir(name, version), version, card.to_json(), card)
