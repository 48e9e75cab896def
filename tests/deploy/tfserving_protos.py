"""Message classes for TF Serving's text-proto configuration files.

``ModelServerConfig`` comes from the ``tensorflow-serving-api`` wheel. That wheel
does not ship ``monitoring_config.proto`` or ``session_bundle_config.proto``, so
``MonitoringConfig`` and ``BatchingParameters`` are declared here with TF Serving's
field names, numbers and types (``tensorflow.serving`` package), which is all
``text_format`` needs to parse a file exactly as the model server does.
``BatchingParameters`` holds the fields every TF Serving 2.x release accepts
(1-7); a file using a newer field fails to parse here, on purpose: it would fail
on an older server too.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

ModelServerConfig = model_server_config_pb2.ModelServerConfig

_F = descriptor_pb2.FieldDescriptorProto


def _field(
    name: str,
    number: int,
    type_: int,
    *,
    type_name: str | None = None,
    repeated: bool = False,
) -> descriptor_pb2.FieldDescriptorProto:
    field = _F(name=name, number=number, type=type_)
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        field.type_name = type_name
    return field


def _build() -> tuple[type, type]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    msg = _F.TYPE_MESSAGE
    proto = descriptor_pb2.FileDescriptorProto(
        name="imgserve_tests/tfserving_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    proto.message_type.add(
        name="PrometheusConfig",
        field=[_field("enable", 1, _F.TYPE_BOOL), _field("path", 2, _F.TYPE_STRING)],
    )
    proto.message_type.add(
        name="MonitoringConfig",
        field=[
            _field("prometheus_config", 1, msg, type_name=".tensorflow.serving.PrometheusConfig")
        ],
    )
    int64 = ".google.protobuf.Int64Value"
    proto.message_type.add(
        name="BatchingParameters",
        field=[
            _field("max_batch_size", 1, msg, type_name=int64),
            _field("batch_timeout_micros", 2, msg, type_name=int64),
            _field("max_enqueued_batches", 3, msg, type_name=int64),
            _field("num_batch_threads", 4, msg, type_name=int64),
            _field("thread_pool_name", 5, msg, type_name=".google.protobuf.StringValue"),
            _field("allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True),
            _field("pad_variable_length_inputs", 7, _F.TYPE_BOOL),
        ],
    )
    pool.Add(proto)
    monitoring = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
    )
    batching = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )
    return monitoring, batching


MonitoringConfig, BatchingParameters = _build()
