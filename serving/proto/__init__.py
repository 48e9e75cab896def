"""The gateway's gRPC API (``imgserve.proto``) and its generated Python modules."""
