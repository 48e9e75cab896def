"""Tests of the serving gateway (``serving/``)."""
