"""Tests of the ``imgserve`` command line (``imgserve/``)."""
