"""``python -m serving.api.grpc``: the gRPC gateway (see :mod:`serving.api.grpc.server`)."""

from serving.api.grpc.server import main

raise SystemExit(main())
