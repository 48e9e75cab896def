"""``imgserve_model_temperature``: the softmax temperature of each version in service."""

from __future__ import annotations

from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contract.model_card import ModelCard


class TemperatureCollector(Collector):
    """``imgserve_model_temperature{model,version}``: the calibration temperature in service."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self):
        family = GaugeMetricFamily(
            "imgserve_model_temperature",
            "Softmax temperature of each version in service (1 = uncalibrated).",
            labels=["model", "version"],
        )
        for model, version, _ in self.service.versions_in_service():
            card = model_card(self.service, model, version)
            if card is not None:
                t = float(card.calibration.temperature)
                family.add_metric([model, str(version)], t)
        yield family


def model_card(service: Any, model: str, version: int) -> ModelCard | None:
    """The model card of a version in service, or None when it has left the catalog."""
    try:
        return service.catalog.version(model, version).card
    except Exception:  # a version that vanished between listing and reading
        return None
