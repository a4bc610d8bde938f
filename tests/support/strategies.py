"""Hypothesis strategies shared by the codec, request and control tests."""

from __future__ import annotations

from hypothesis import strategies as st

from agent.adapters.mqtt.kurapayload import KuraMessage, KuraPosition, MetricValue

metric_values = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(MetricValue.int32),
    st.integers(-(2**63), 2**63 - 1).map(MetricValue.int64),
    st.floats(allow_nan=False).map(MetricValue.double),
    st.floats(allow_nan=False, width=32).map(MetricValue.float32),
    st.booleans().map(MetricValue.boolean),
    st.text().map(MetricValue.string),
    st.binary().map(MetricValue.blob),
)
messages = st.builds(
    KuraMessage,
    timestamp_ms=st.none() | st.integers(-(2**63), 2**63 - 1),
    metrics=st.dictionaries(st.text(max_size=20), metric_values, max_size=8),
    body=st.none() | st.binary(max_size=300),
    position=st.none()
    | st.builds(
        KuraPosition,
        latitude=st.floats(-90, 90),
        longitude=st.floats(-180, 180),
        satellites=st.none() | st.integers(0, 64),
        timestamp=st.none() | st.integers(0, 2**40),
    ),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
