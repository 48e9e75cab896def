"""The serving gateway: REST (Flask + gunicorn) and gRPC over one service layer.

``serving.app:create_app`` is the WSGI factory, ``python -m serving.api.grpc``
the gRPC server; ``serving.service`` holds the logic both share, ``serving.backends``
the places forward passes run (in-process, or TensorFlow Serving over gRPC/REST).
"""
