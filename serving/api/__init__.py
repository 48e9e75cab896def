"""The protocol layers over the service layer: ``rest`` (Flask), ``grpc``, and the
one error table (``errors``) both render failures from."""
