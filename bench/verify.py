"""How fast a signature is verified: ImageGuard against the floor of the same work done by hand.

Run: ``.venv/bin/python bench/verify.py [--runs 50] [--json]``. It starts its own docker-registry on a free
loopback port (plain HTTP), pushes a small image there and signs it the way ``imageguard sign`` does.

- **cold verification**: ``verify_reference`` on a digest reference with a fresh ``RegistryClient`` (no
  connection, token or result kept from a previous run), p50 of ``--runs`` runs, with the number of HTTP
  requests it made (``RegistryClient.request_count``).
- **floor**, measured in the same run, interleaved: the same fetches by raw HTTP with a fresh
  ``requests.Session`` (the ``.sig`` manifest, then its payload blob, both hash-checked) and one ECDSA
  signature check with ``cryptography``; the public key is loaded once, outside the timing.
- a tag reference, for information (one more request: the tag lookup).
- **cached decision**: ``agent.core.decision.decide`` for a container whose digest is in the verified set
  (1000 verified digests, 1000 allowlist entries that do not match), p50 over many runs.

Goals (issue 3): cold verification within 1.5x the floor, at most 3 requests for a digest reference, a
cached decision under 1 ms.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.adapters.registry import OCI_MANIFEST, RegistryClient, Repository  # noqa: E402
from agent.adapters.signatures import attach_signature, signature_tag  # noqa: E402
from agent.config import RegistryConfig  # noqa: E402
from agent.core.decision import Evidence, VerifiedDigest, decide  # noqa: E402
from agent.core.digest import Digest  # noqa: E402
from agent.core.facts import ContainerFacts  # noqa: E402
from agent.core.imageref import ImageRef  # noqa: E402
from agent.core.policy import EffectivePolicy, Enforcement, TrustAnchor  # noqa: E402
from agent.runtime.verification import verify_reference  # noqa: E402
from agent.verify.cosign import keys  # noqa: E402
from agent.verify.cosign.artifacts import ANN_SIGNATURE  # noqa: E402
from agent.verify.cosign.sign import sign_image  # noqa: E402
from tests.support.fixtures.registry import push_tiny_image, start_registry, stop_registry  # noqa: E402


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def setup(host: str) -> tuple[ImageRef, ImageRef, TrustAnchor, Any]:
    """Push an image, sign it, return (digest reference, tag reference, anchor, public key)."""
    config = RegistryConfig(host=host, insecure=True)
    repo = Repository(host, "bench/app")
    key = ec.generate_private_key(ec.SECP256R1())
    with RegistryClient(registries=[config]) as client:
        image = push_tiny_image(client, repo, "1")
        by_digest = ImageRef.parse(f"{repo}@{image.digest}")
        attach_signature(client, by_digest, image.digest, sign_image(image.digest, str(repo), key))
    pem = keys.public_key_pem(key.public_key()).decode()
    anchor = TrustAnchor(name="bench", kind="key", pem=pem, scope=(f"{host}/bench/*",))
    public = serialization.load_pem_public_key(pem.encode())
    return by_digest, ImageRef.parse(f"{repo}:1"), anchor, public


def imageguard_run(host: str, ref: ImageRef, anchor: TrustAnchor) -> tuple[float, int]:
    t0 = time.perf_counter()
    with RegistryClient(
        registries=[RegistryConfig(host=host, insecure=True)], timeout=5, deadline=10
    ) as client:
        result = verify_reference(client, ref, [anchor], now=time.time())
    elapsed = time.perf_counter() - t0
    if result.verified is None:
        raise SystemExit(f"benchmark image did not verify: {result.reasons}")
    return elapsed, result.requests


def floor_run(host: str, ref: ImageRef, public: Any) -> tuple[float, int]:
    assert ref.digest is not None
    base = f"http://{host}/v2/{ref.repository}"
    t0 = time.perf_counter()
    with requests.Session() as session:
        resp = session.get(
            f"{base}/manifests/{signature_tag(ref.digest)}", headers={"Accept": OCI_MANIFEST}, timeout=5
        )
        raw = resp.content
        if "sha256:" + hashlib.sha256(raw).hexdigest() != resp.headers["Docker-Content-Digest"]:
            raise SystemExit("floor: manifest digest mismatch")
        layer = json.loads(raw)["layers"][0]
        payload = session.get(f"{base}/blobs/{layer['digest']}", timeout=5).content
        if "sha256:" + hashlib.sha256(payload).hexdigest() != layer["digest"]:
            raise SystemExit("floor: payload digest mismatch")
        signature = base64.b64decode(layer["annotations"][ANN_SIGNATURE])
        public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    return time.perf_counter() - t0, 2


def cached_decision(anchor: TrustAnchor, runs: int) -> float:
    """p50 in ms of ``decide`` for a container whose repo digest was verified before."""
    digest = Digest.of(b"verified image")
    others = [Digest.of(b"other %d" % i) for i in range(1000)]
    policy = EffectivePolicy(
        enforcement=Enforcement(),
        allowlist=frozenset(Digest.of(b"allowed %d" % i) for i in range(1000)),
        trust_anchors=(anchor,),
    )
    verified = {d: (VerifiedDigest(d, anchor.name, anchor.fingerprint),) for d in others}
    verified[digest] = (VerifiedDigest(digest, anchor.name, anchor.fingerprint, "bench/app"),)
    evidence = Evidence(verified, {})
    facts = ContainerFacts(
        id="c" * 64,
        name="bench",
        image=f"{anchor.scope[0][:-2]}/app:1",
        image_id=Digest.of(b"image config"),
        repo_digests=((ImageRef.parse(anchor.scope[0][:-2] + "/app"), digest),),
        state="running",
    )
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        decision = decide(facts, policy, evidence)
        samples.append(time.perf_counter() - t0)
    if decision.reason.value != "verified-before":
        raise SystemExit(f"cached decision: unexpected {decision.reason}")
    return p50_ms(samples)


def interleaved(runs: int, *funcs: Callable[[], tuple[float, int]]) -> list[tuple[list[float], set[int]]]:
    out: list[tuple[list[float], set[int]]] = [([], set()) for _ in funcs]
    for f in funcs:  # warm-up: imports, first connection to the registry, key parsing caches
        f()
    for _ in range(runs):
        for (samples, counts), f in zip(out, funcs, strict=True):
            elapsed, count = f()
            samples.append(elapsed)
            counts.add(count)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ig-bench-verify-") as tmp:
        running = start_registry(Path(tmp))
        try:
            host = running.server.host
            by_digest, by_tag, anchor, public = setup(host)
            (ig, ig_req), (fl, fl_req), (tag, tag_req) = interleaved(
                args.runs,
                lambda: imageguard_run(host, by_digest, anchor),
                lambda: floor_run(host, by_digest, public),
                lambda: imageguard_run(host, by_tag, anchor),
            )
        finally:
            stop_registry(running)
    cached = cached_decision(anchor, args.decisions)
    ratio = p50_ms(ig) / p50_ms(fl)
    figures = {
        "runs": args.runs,
        "cold_digest_p50_ms": round(p50_ms(ig), 3),
        "cold_digest_requests": sorted(ig_req),
        "floor_p50_ms": round(p50_ms(fl), 3),
        "floor_requests": sorted(fl_req),
        "ratio_to_floor": round(ratio, 3),
        "cold_tag_p50_ms": round(p50_ms(tag), 3),
        "cold_tag_requests": sorted(tag_req),
        "cached_decision_p50_ms": round(cached, 5),
        "goals": {
            "ratio_to_floor_at_most_1.5": ratio <= 1.5,
            "requests_at_most_3": max(ig_req) <= 3,
            "cached_decision_under_1ms": cached < 1.0,
        },
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"cold verification, digest reference  p50 {figures['cold_digest_p50_ms']:8.3f} ms  requests {max(ig_req)}"
        )
        print(
            f"floor (raw HTTP + one ECDSA check)     p50 {figures['floor_p50_ms']:8.3f} ms  requests {max(fl_req)}"
        )
        print(f"ratio to floor                         {ratio:8.2f}x   (goal <= 1.5x)")
        print(
            f"cold verification, tag reference     p50 {figures['cold_tag_p50_ms']:8.3f} ms  requests {max(tag_req)}"
        )
        print(f"cached decision (decide)             p50 {cached * 1000:8.1f} us   (goal < 1 ms)")
        print("goals met: " + ", ".join(f"{k}={v}" for k, v in figures["goals"].items()))
    return 0 if all(figures["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
