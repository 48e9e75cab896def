"""Helpers shared by the test packages: import these, never another test file or conftest."""
