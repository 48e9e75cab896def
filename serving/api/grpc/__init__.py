"""The gRPC API: ``python -m serving.api.grpc`` serves ``imgserve.v1.ImageService``.

``codec`` converts messages to and from service-layer types, ``servicer`` answers
the calls, ``server`` runs one server process, ``supervisor`` several on one port.
"""
