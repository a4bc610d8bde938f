"""Docker API requests, classified from the raw request target as dockerd's router reads it."""

from __future__ import annotations

import pytest

from agent.core.api import Op, classify, routed_path

CASES = [
    # (method, request target, operation, container or plugin name)
    ("POST", "/v1.41/containers/abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "/containers/abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "/v1.24/containers/web-1/restart?t=0", Op.CONTAINER_START, "web-1"),
    ("post", "/v1.41/containers/abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "http://docker/v1.41/containers/abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "HTTP://docker:2375/containers/abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "unix:///containers/abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "x-y.z+w://h/v1.41/containers/abc/start?x=1", Op.CONTAINER_START, "abc"),
    ("POST", "/v1.41/containers/abc%2Fstart", Op.CONTAINER_START, "abc"),
    ("POST", "/v1.41/containers/%61bc/start", Op.CONTAINER_START, "abc"),
    ("POST", "/v1.41//containers/abc/start/", Op.CONTAINER_START, "abc"),
    ("POST", "//containers/abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "/v1.41/containers/x/../abc/start", Op.CONTAINER_START, "abc"),
    ("POST", "/v1.41/containers/a/b/start", Op.CONTAINER_START, "a/b"),
    ("POST", "/v1.41/containers/abc/start#frag", Op.CONTAINER_START, "abc"),
    ("POST", "/v1.41/containers/create?name=start", Op.CONTAINER_CREATE, None),
    ("POST", "/v1.41/containers/abc/exec", Op.CONTAINER_EXEC, "abc"),
    ("POST", "/v1.41/exec/e1/start", Op.CONTAINER_EXEC, None),
    ("PUT", "/v1.41/containers/abc/archive?path=/bin", Op.CONTAINER_COPY_IN, "abc"),
    ("POST", "/v1.41/containers/abc/rename?name=x", Op.CONTAINER_RENAME, "abc"),
    ("POST", "/v1.41/plugins/pull?remote=evil/p&name=imageguard", Op.PLUGIN, "imageguard"),
    ("POST", "/v1.41/plugins/create?name=imageguard", Op.PLUGIN, "imageguard"),
    ("POST", "/v1.41/plugins/evil/p:latest/enable", Op.PLUGIN, "evil/p:latest"),
    ("POST", "/v1.41/plugins/start/enable", Op.PLUGIN, "start"),
    ("DELETE", "/v1.41/plugins/evil", Op.PLUGIN, "evil"),
    ("POST", "/v1.41/swarm/init", Op.SWARM, None),
    ("POST", "/v1.41/swarm/join", Op.SWARM, None),
    ("POST", "/v1.41/services/create", Op.SWARM, None),
    ("POST", "/v1.41/services/s1/update", Op.SWARM, None),
    ("POST", "/v1.41/build?t=x", Op.BUILD, None),
    ("POST", "/session", Op.BUILD, None),
    ("POST", "/grpc", Op.BUILD, None),
    ("POST", "/v1.41/containers/abc/stop", Op.OTHER, None),
    ("POST", "/v1.41/containers/abc/unpause", Op.OTHER, None),
    ("POST", "/v1.41/containers/abc/kill?signal=KILL", Op.OTHER, None),
    ("DELETE", "/v1.41/containers/abc?force=1", Op.CONTAINER_REMOVE, "abc"),
    ("POST", "/v1.41/images/create?fromImage=x", Op.OTHER, None),
    ("POST", "/v1.41/networks/create", Op.OTHER, None),
    ("GET", "/v1.41/containers/json", Op.READ, None),
    ("GET", "http://docker/v1.41/containers/abc/start", Op.READ, None),
    ("HEAD", "/_ping", Op.READ, None),
    ("POST", "/v1.41/containers/abc/started", Op.UNKNOWN, None),
    ("POST", "/v1.41/nothing", Op.UNKNOWN, None),
    ("PATCH", "/v1.41/containers/abc/start", Op.UNKNOWN, None),
    ("POST", "containers/abc/start", Op.UNKNOWN, None),
    ("POST", "*", Op.UNKNOWN, None),
    ("POST", "/v1.41/containers/abc%zz/start", Op.UNKNOWN, None),
    ("POST", "/v1.41/containers/abc%ff/start", Op.UNKNOWN, None),
    ("POST", "/v1.41/containers/a%00b/start", Op.UNKNOWN, None),
]


@pytest.mark.parametrize(("method", "target", "op", "ref"), CASES)
def test_classify(method: str, target: str, op: Op, ref: str | None) -> None:
    request = classify(method, target)
    assert request.op is op, request
    assert (request.name if op is Op.PLUGIN else request.container) == ref
    if op is Op.UNKNOWN:
        assert request.why


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("http://docker", "/"),
        ("http://docker?x=1", "/"),
        ("/v1.41", "/v1.41"),
        ("/v1.41/", "/v1.41"),
        ("/v1.41/info", "/info"),
        ("/v1/info", "/info"),
    ],
)
def test_routed_path(target: str, path: str) -> None:
    routed = routed_path(target)
    assert routed is not None and routed[0] == path
