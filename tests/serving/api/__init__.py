"""Tests of the protocol layers (``serving/api/``)."""
