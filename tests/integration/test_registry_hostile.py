"""RegistryClient against a hostile or broken peer: every case ends in a clear RegistryError, in bounded time."""

from __future__ import annotations

import gzip
import http.server
import json
import time
from collections.abc import Callable

import pytest

from agent.adapters.registry import OCI_INDEX, OCI_MANIFEST, RegistryClient, Repository
from agent.config import RegistryConfig
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.errors import RegistryError, RegistryUnreachable
from tests.support.fixtures.registry import FakeRegistry, reply

pytestmark = pytest.mark.integration

Handler = http.server.BaseHTTPRequestHandler
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": 2,
            "digest": str(Digest.of(b"{}")),
        },
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = Digest.of(MANIFEST)
OTHER = Digest.of(b"something else")


def _manifest(handler: Handler, body: bytes = MANIFEST, **headers: str) -> None:
    reply(handler, 200, body, {"Content-Type": OCI_MANIFEST, **headers})


def _client(fake: FakeRegistry, **kwargs: object) -> RegistryClient:
    settings: dict[str, object] = {"insecure_hosts": [fake.host], "timeout": 1.0, "deadline": 2.0}
    settings.update(kwargs)
    return RegistryClient(**settings)  # type: ignore[arg-type]


def _drip(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", OCI_MANIFEST)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    for _ in range(100000):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.02)


def _endless(handler: Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", OCI_MANIFEST)
    handler.send_header("Connection", "close")
    handler.end_headers()
    chunk = b"[" * 65536
    for _ in range(10000):  # 640 MiB if nobody stops reading
        handler.wfile.write(chunk)


def _redirect_loop(handler: Handler) -> None:
    target = "/v2/a/b/manifests/two" if handler.path.endswith("/one") else "/v2/a/b/manifests/one"
    reply(handler, 307, headers={"Location": target})


def _redirect_forever(handler: Handler) -> None:
    reply(handler, 302, headers={"Location": handler.path + "x"})


def _stall(handler: Handler) -> None:
    time.sleep(3)


def _trickle_headers(handler: Handler) -> None:
    """A status line, then one header byte every 50 ms, forever: each recv returns well within the
    socket timeout, so only a deadline held on the socket itself ends it."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(100000):
        handler.wfile.write(b"X-Slow: " if _ == 0 else b"a")
        handler.wfile.flush()
        time.sleep(0.05)


def _basic_401(handler: Handler) -> None:
    reply(handler, 401, b"{}", {"WWW-Authenticate": 'Basic realm="x"'})


def _bearer(token_body: bytes, content_type: str = "application/json") -> Callable[[Handler], None]:
    def respond(handler: Handler) -> None:
        if handler.path.startswith("/token"):
            reply(handler, 200, token_body, {"Content-Type": content_type})
        else:
            host = handler.headers["Host"]
            challenge = f'Bearer realm="http://{host}/token",service="fake",scope="repository:a/b:pull"'
            reply(handler, 401, b"", {"WWW-Authenticate": challenge})

    return respond


CASES: list[tuple[str, Callable[[Handler], None], str, str]] = [
    # id, responder, expected error code, words the message must contain
    ("wrong-digest-header", lambda h: _manifest(h, **{"Docker-Content-Digest": str(OTHER)}),
     "registry-digest-mismatch", "does not match its digest"),
    ("huge-declared", lambda h: reply(h, 200, b"", {"Content-Length": str(50 * 2**20)}),
     "registry-response-too-large", "over the 4194304-byte limit"),
    ("endless", _endless, "registry-response-too-large", "exceeds the 4194304-byte limit"),
    ("slow-drip", _drip, "registry-unreachable", "slow or stalled"),
    ("trickled-headers", _trickle_headers, "registry-unreachable", "slow or stalled"),
    ("stalled-headers", _stall, "registry-unreachable", "did not answer within"),
    ("redirect-loop", _redirect_loop, "registry-error", "redirects in a loop"),
    ("redirect-forever", _redirect_forever, "registry-error", "more than 5 redirects"),
    ("redirect-to-ftp", lambda h: reply(h, 302, headers={"Location": "ftp://127.0.0.1/x"}),
     "registry-error", "refusing redirect"),
    ("redirect-without-location", lambda h: reply(h, 302), "registry-error", "without a Location"),
    ("invalid-json", lambda h: _manifest(h, b"{not json"), "registry-error", "not JSON"),
    ("json-array", lambda h: _manifest(h, b"[]"), "registry-error", "not a JSON object"),
    ("html", lambda h: reply(h, 200, b"<html></html>", {"Content-Type": "text/html"}), "registry-error", "not JSON"),
    ("wrong-media-type", lambda h: reply(h, 200, b"{}", {"Content-Type": "text/plain"}),
     "registry-error", "unexpected manifest media type"),
    ("type-disagrees-with-body", lambda h: reply(h, 200, MANIFEST, {"Content-Type": OCI_INDEX}),
     "registry-error", "the document says"),
    ("schema1", lambda h: _manifest(h, b'{"schemaVersion":1,"name":"a/b"}'), "registry-error", "schema 1"),
    ("gzip-body", lambda h: _manifest(h, gzip.compress(MANIFEST), **{"Content-Encoding": "gzip"}),
     "registry-error", "gzip"),
    ("server-error", lambda h: reply(h, 500, b'{"errors":[{"code":"UNKNOWN","message":"disk full"}]}'),
     "registry-error", "HTTP 500: UNKNOWN: disk full"),
    ("401-loop-no-credentials", _basic_401, "registry-auth-failed", "requires a login"),
    ("unsupported-auth", lambda h: reply(h, 401, headers={"WWW-Authenticate": "Negotiate"}),
     "registry-auth-failed", "do not support"),
    ("401-without-challenge", lambda h: reply(h, 401), "registry-auth-failed", "do not support"),
    ("token-endpoint-html", _bearer(b"<html>login</html>", "text/html"),
     "registry-error", "did not answer with a JSON token"),
    ("token-endpoint-no-token", _bearer(b'{"expires_in": 60}'), "registry-error", "no usable token"),
    ("token-endpoint-header-injection", _bearer(b'{"token": "a\\r\\nX-Evil: 1"}'), "registry-error", "no usable token"),
    ("bearer-401-loop", _bearer(b'{"token": "t"}'), "registry-auth-failed", "refused our credentials"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "responder", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_hostile_manifest_responses(
    fake_registry: FakeRegistry, name: str, responder: Callable[[Handler], None], code: str, words: str
) -> None:
    fake_registry.respond = responder
    started = time.monotonic()
    with _client(fake_registry) as client, pytest.raises(RegistryError) as info:
        client.resolve(ImageRef.parse(f"{fake_registry.host}/a/b:one"))
    assert time.monotonic() - started < 4, "every operation is bounded by its deadline"
    assert info.value.code == code, str(info.value)
    assert words in str(info.value)
    assert fake_registry.host in str(info.value), "the message names the registry"
    assert client.request_count <= 7


def test_manifest_by_digest_must_hash_to_that_digest(fake_registry: FakeRegistry) -> None:
    fake_registry.respond = _manifest
    with _client(fake_registry) as client:
        repo = Repository(fake_registry.host, "a/b")
        assert client.get_manifest(repo, MANIFEST_DIGEST).raw == MANIFEST
        with pytest.raises(RegistryError) as info:
            client.get_manifest(repo, OTHER)
    assert info.value.code == "registry-digest-mismatch"
    assert str(OTHER) in str(info.value) and str(MANIFEST_DIGEST) in str(info.value)


def test_manifest_of_a_type_not_asked_for_is_refused(fake_registry: FakeRegistry) -> None:
    fake_registry.respond = _manifest
    with (
        _client(fake_registry) as client,
        pytest.raises(RegistryError, match=r"expected application/vnd\.oci\.image\.index"),
    ):
        client.get_manifest(Repository(fake_registry.host, "a/b"), "x", accept=(OCI_INDEX,))


def test_blob_must_hash_to_its_digest(fake_registry: FakeRegistry) -> None:
    fake_registry.respond = lambda h: reply(h, 200, b"tampered", {"Content-Type": "application/octet-stream"})
    with _client(fake_registry) as client, pytest.raises(RegistryError) as info:
        client.get_blob(Repository(fake_registry.host, "a/b"), Digest.of(b"original"))
    assert info.value.code == "registry-digest-mismatch"


def test_blob_redirect_does_not_forward_credentials(fake_registry: FakeRegistry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, str | None]] = []
    data = b"blob bytes"

    def respond(handler: Handler) -> None:
        seen.append((handler.headers["Host"], handler.headers.get("Authorization")))
        if handler.headers.get("Authorization") is None and handler.headers["Host"].startswith("127.0.0.1"):
            _basic_401(handler)
        elif handler.path.startswith("/v2/"):
            # redirect to the same server under another name: a different host for the client
            port = fake_registry.host.split(":")[1]
            reply(handler, 307, headers={"Location": f"http://localhost:{port}/storage/blob"})
        else:
            reply(handler, 200, data)

    fake_registry.respond = respond
    password = tmp_path / "pw"
    password.write_text("s3cret")
    cfg = RegistryConfig(host=fake_registry.host, username="u", password_file=password, insecure=True)
    port = fake_registry.host.split(":")[1]
    with _client(
        fake_registry, registries=[cfg], insecure_hosts=[fake_registry.host, f"localhost:{port}"]
    ) as client:
        assert client.get_blob(Repository(fake_registry.host, "a/b"), Digest.of(data)) == data
    assert seen[-1] == (f"localhost:{port}", None)
    assert seen[-2][1] is not None and seen[-2][1].startswith("Basic ")


def test_connection_refused_is_unreachable() -> None:
    with (
        RegistryClient(insecure_hosts=["127.0.0.1:9"], timeout=1, deadline=2) as client,
        pytest.raises(RegistryUnreachable) as info,
    ):
        client.resolve(ImageRef.parse("127.0.0.1:9/a/b:c"))
    assert "cannot reach the registry" in str(info.value)
    assert info.value.code == "registry-unreachable"


def test_plain_http_realm_gets_no_credentials_from_an_https_registry() -> None:
    # unit-level guard inside the client: a TLS registry's challenge may not send us to plain HTTP
    client = RegistryClient(
        registries=[RegistryConfig(host="reg.example:443", username="u", password_env="PW")]
    )
    with pytest.raises(RegistryError, match="plain-HTTP realm"):
        client._fetch_token(  # exercising the private guard directly: no network is involved
            "reg.example:443", {"realm": "http://evil.example/token"}, "repository:a:pull", _deadline()
        )
    assert client.request_count == 0


def _deadline():  # type: ignore[no-untyped-def]
    from agent.adapters.registry import _Deadline

    return _Deadline(5, "test")
