"""The protobuf library's KuraPayload class: an independent reference for the agent's own wire codec.

Built at runtime from descriptor_pb2 with the field numbers and types of Kura's kurapayload.proto.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent.adapters.mqtt.kurapayload import MetricType


def _build_classes() -> tuple[Any, Any]:
    fdp = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="imageguard/kurapayload.proto", package="kuradatatypes")
    f.syntax = "proto2"
    payload = f.message_type.add(name="KuraPayload")

    def add(msg: Any, name: str, number: int, label: int, ftype: int, type_name: str = "") -> None:
        fld = msg.field.add(name=name, number=number, label=label, type=ftype)
        if type_name:
            fld.type_name = type_name

    opt, req, rep = fdp.LABEL_OPTIONAL, fdp.LABEL_REQUIRED, fdp.LABEL_REPEATED
    metric = payload.nested_type.add(name="KuraMetric")
    vt = metric.enum_type.add(name="ValueType")
    for t in MetricType:
        vt.value.add(name=t.name, number=int(t))
    add(metric, "name", 1, req, fdp.TYPE_STRING)
    add(metric, "type", 2, req, fdp.TYPE_ENUM, ".kuradatatypes.KuraPayload.KuraMetric.ValueType")
    for name, number, ftype in (
        ("double_value", 3, fdp.TYPE_DOUBLE),
        ("float_value", 4, fdp.TYPE_FLOAT),
        ("long_value", 5, fdp.TYPE_INT64),
        ("int_value", 6, fdp.TYPE_INT32),
        ("bool_value", 7, fdp.TYPE_BOOL),
        ("string_value", 8, fdp.TYPE_STRING),
        ("bytes_value", 9, fdp.TYPE_BYTES),
    ):
        add(metric, name, number, opt, ftype)

    position = payload.nested_type.add(name="KuraPosition")
    add(position, "latitude", 1, req, fdp.TYPE_DOUBLE)
    add(position, "longitude", 2, req, fdp.TYPE_DOUBLE)
    for name, number, ftype in (
        ("altitude", 3, fdp.TYPE_DOUBLE),
        ("precision", 4, fdp.TYPE_DOUBLE),
        ("heading", 5, fdp.TYPE_DOUBLE),
        ("speed", 6, fdp.TYPE_DOUBLE),
        ("timestamp", 7, fdp.TYPE_INT64),
        ("satellites", 8, fdp.TYPE_INT32),
        ("status", 9, fdp.TYPE_INT32),
    ):
        add(position, name, number, opt, ftype)

    add(payload, "timestamp", 1, opt, fdp.TYPE_INT64)
    add(payload, "position", 2, opt, fdp.TYPE_MESSAGE, ".kuradatatypes.KuraPayload.KuraPosition")
    payload.extension_range.add(start=3, end=5000)  # end is exclusive: 3 to 4999
    add(payload, "metric", 5000, rep, fdp.TYPE_MESSAGE, ".kuradatatypes.KuraPayload.KuraMetric")
    add(payload, "body", 5001, opt, fdp.TYPE_BYTES)

    # a private pool, so another copy of kuradatatypes in the process cannot clash with ours
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    desc = pool.FindMessageTypeByName("kuradatatypes.KuraPayload")
    return message_factory.GetMessageClass(desc), desc


KuraPayloadPB, KURA_PAYLOAD_DESCRIPTOR = _build_classes()
