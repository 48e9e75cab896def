"""Tests of the gRPC API (``serving/api/grpc/``)."""
