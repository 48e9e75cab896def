"""The parent version on disk and the forward passes calibration measures with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from calibration.errors import CalibrationError
from contract import bn
from contract.model_card import KERAS_MODEL_RELPATH, ModelCard, read_model_card
from contract.repository import ModelRepository


@dataclass(frozen=True)
class StableParent:
    """The version labelled ``stable``: what a calibration starts from."""

    repo: ModelRepository
    name: str
    version: int
    dir: Path
    card: ModelCard

    @property
    def probe_names(self) -> list[str]:
        """The BN probe layers the card's drift references are kept for."""
        return list(self.card.bn_reference.probe_names)

    @property
    def temperature(self) -> float:
        """The temperature the parent serves."""
        return float(self.card.calibration.temperature)

    def reference_set(self, default_file: str, hint: str = "") -> tuple[Path, bytes]:
        """Path and bytes of the reference set the version ships; CalibrationError if none."""
        shipped = self.card.reference_set
        file = shipped.file if shipped is not None and shipped.file else default_file
        path = self.dir / "assets.extra" / file
        if not path.exists():
            raise CalibrationError(
                f"version {self.version} of {self.name} ships no reference set ({path}){hint}"
            )
        return path, path.read_bytes()


def load_stable_parent(model_base: str | os.PathLike[str], name: str) -> StableParent:
    """The ``stable`` version of ``name`` and its card; CalibrationError when there is none."""
    repo = ModelRepository(model_base)
    version = repo.labels(name).get("stable")
    if version is None:
        raise CalibrationError(f"{name} has no version labelled 'stable' in {repo.config_path}")
    version_dir = repo.version_dir(name, version)
    return StableParent(repo, name, int(version), version_dir, read_model_card(version_dir))


def load_keras_model(version_dir: Path) -> keras.Model:
    """The Keras model a version ships (``assets.extra/model.keras``)."""
    # compile=False: only the graph and weights are needed; the optimizer's custom
    # learning-rate schedule does not have to be importable.
    return keras.models.load_model(version_dir / KERAS_MODEL_RELPATH, compile=False)


def logits(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Inference-mode outputs of ``model`` on ``x``."""
    return bn.predict_in_mode(model, x, training=False, batch_size=batch_size)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Inference-mode top-1 accuracy of a classifier on ``(x, y)``."""
    return float(np.mean(logits(model, x, batch_size).argmax(-1) == y))


def probe_moments(
    model: keras.Model, names: list[str], x: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``bn_input_mean``/``bn_input_sqmean`` in inference mode (the signature's)."""

    def build(m: keras.Model):
        collector = bn.bn_input_model(m, bn.probe_layers(m, names))

        def moments(x: tf.Tensor):
            outs = collector(x, training=False)
            return bn.probe_moments(list(outs) if isinstance(outs, list | tuple) else [outs])

        return moments

    fn = bn.traced(model, ("probe_moments", tuple(names)), x.shape, build)
    means, sqmeans = [], []
    for i in range(0, len(x), batch_size):
        m, s = fn(tf.convert_to_tensor(x[i : i + batch_size], tf.float32))
        means.append(m.numpy())
        sqmeans.append(s.numpy())
    return np.concatenate(means), np.concatenate(sqmeans)
