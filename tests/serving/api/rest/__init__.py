"""Tests of the REST API (``serving/api/rest/``)."""
