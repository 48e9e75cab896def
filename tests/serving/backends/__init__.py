"""Tests of the model backends (``serving/backends/``)."""
