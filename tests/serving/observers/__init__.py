"""Tests of the prediction observers (``serving/observers/``)."""
