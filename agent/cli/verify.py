"""Signature commands: verify, sign, generate-key-pair, and the trust anchors of the device policy."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from agent.adapters.dockerhost import DockerHost
from agent.cli.common import (
    EXIT_NEGATIVE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    emit,
    format_table,
    json_flag,
    load_config,
    warn_issuer_only,
)
from agent.config import Config, RegistryConfig
from agent.control.service import Service
from agent.core.anchors import Identity, TrustAnchor
from agent.core.imageref import ImageRef
from agent.errors import InputError, NotFound


def register(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="verify an image's cosign signature (exit 0 valid, 1 not valid, 2 error)",
        description="Verify IMAGE (tag or digest reference) against the given keys/CA, or, with none given, "
        "against the trust anchors of the device policy whose scope covers the image.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--key", action="append", default=[], metavar="FILE", help="PEM public key (repeatable)")
    p.add_argument("--ca", metavar="FILE", help="PEM root CA certificate(s) for certificate-signed images")
    p.add_argument("--intermediates", metavar="FILE", help="PEM intermediate certificates")
    p.add_argument("--certificate-identity", metavar="X", help="required subject alternative name")
    p.add_argument("--certificate-identity-regexp", metavar="RE", help="SAN must fully match this expression")
    p.add_argument("--certificate-oidc-issuer", metavar="X", help="required OIDC issuer")
    p.add_argument(
        "--certificate-oidc-issuer-regexp", metavar="RE", help="issuer must fully match this expression"
    )
    p.add_argument("--rekor-key", metavar="FILE", help="Rekor public key (PEM) for offline tlog verification")
    p.add_argument("--require-tlog", action="store_true", help="reject signatures without a valid tlog entry")
    p.add_argument(
        "--strict-identity", action="store_true", help="the signed reference must name this repository"
    )
    p.add_argument(
        "--any-identity",
        action="store_true",
        help="with --ca and no --certificate-identity: accept any certificate the root issues",
    )
    _registry_flags(p)
    json_flag(p)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("sign", help="sign an image as cosign does and push the signature to its registry")
    p.add_argument("image", metavar="IMAGE", help="tag or digest reference (a tag is resolved to its digest)")
    p.add_argument("--key", required=True, metavar="FILE", help="cosign.key (encrypted) or a PEM private key")
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="file holding the key's password (default: $COSIGN_PASSWORD, else asked on the terminal)",
    )
    _registry_flags(p)
    json_flag(p)
    p.set_defaults(handler=cmd_sign)

    p = sub.add_parser("generate-key-pair", help="write a cosign-compatible cosign.key and cosign.pub")
    p.add_argument(
        "--output-key-prefix", default="cosign", metavar="PREFIX", help="file name prefix (default cosign)"
    )
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="file holding the password (default: $COSIGN_PASSWORD, else asked on the terminal)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    json_flag(p)
    p.set_defaults(handler=cmd_generate_key_pair)

    p = sub.add_parser("anchors", help="show or change the trust anchors of the device policy")
    asub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = asub.add_parser("list", help="list the effective trust anchors")
    json_flag(q)
    q.set_defaults(handler=cmd_anchors_list)
    q = asub.add_parser("add", help="add or replace a trust anchor (digests it verified before are revoked)")
    q.add_argument("name")
    kind = q.add_mutually_exclusive_group(required=True)
    kind.add_argument("--key", metavar="FILE", help="PEM public key")
    kind.add_argument("--ca", metavar="FILE", help="PEM root CA certificate(s)")
    q.add_argument("--intermediates", metavar="FILE")
    q.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="PATTERN",
        help="images it vouches for: HOST[:PORT]/PATH, '*' within a path segment, '**' across "
        "(e.g. registry:5000/acme/**); '**' for every image (the default)",
    )
    q.add_argument("--certificate-identity", metavar="X")
    q.add_argument("--certificate-identity-regexp", metavar="RE")
    q.add_argument("--certificate-oidc-issuer", metavar="X")
    q.add_argument("--certificate-oidc-issuer-regexp", metavar="RE")
    q.add_argument("--rekor-key", metavar="FILE")
    q.add_argument("--require-tlog", action="store_true")
    q.add_argument("--strict-identity", action="store_true")
    q.add_argument(
        "--any-identity",
        action="store_true",
        help="with --ca: accept any certificate the root issues (otherwise --certificate-identity[-regexp] "
        "or --certificate-oidc-issuer[-regexp] is required)",
    )
    json_flag(q)
    q.set_defaults(handler=cmd_anchors_add)
    q = asub.add_parser("remove", help="remove a trust anchor; digests it verified are revoked and rescanned")
    q.add_argument("name")
    json_flag(q)
    q.set_defaults(handler=cmd_anchors_remove)


def _registry_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry-username", metavar="U", help="registry user (with --registry-password-file)")
    p.add_argument("--registry-password-file", metavar="F", help="file holding the registry password")
    p.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST",
        help="allow plain HTTP to HOST[:PORT]",
    )


def _read(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path}: not a text (PEM) file") from None


def _password(path: str | None, *, confirm: bool = False) -> str:
    """The key passphrase, as cosign finds it: ``--passphrase-file``, else ``$COSIGN_PASSWORD`` (may be set
    to empty on purpose), else a prompt on the terminal. Never a silent empty passphrase."""
    if path is not None:
        text = _read(path, "passphrase file")
        return (text or "").rstrip("\r\n")
    if "COSIGN_PASSWORD" in os.environ:
        return os.environ["COSIGN_PASSWORD"]
    if not sys.stdin.isatty():
        raise InputError(
            "no passphrase: give --passphrase-file FILE or set COSIGN_PASSWORD (COSIGN_PASSWORD= for none), "
            "or run on a terminal to be asked"
        )
    import getpass

    first = getpass.getpass("Enter password for private key: ")
    if confirm and getpass.getpass("Enter password for private key again: ") != first:
        raise InputError("the passwords do not match")
    return first


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write a key file: never through a symlink, and with ``mode`` even when the file existed before."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path} is a symbolic link; refusing to write a key through it") from None
        raise InputError(f"{path}: cannot write: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def _identities(args: argparse.Namespace) -> tuple[Identity, ...]:
    ident = Identity(
        subject=args.certificate_identity,
        subject_regexp=args.certificate_identity_regexp,
        issuer=args.certificate_oidc_issuer,
        issuer_regexp=args.certificate_oidc_issuer_regexp,
    )
    return (ident,) if ident.to_dict() else ()


def _anchor_from_flags(
    args: argparse.Namespace, name: str, key: str | None, scope: tuple[str, ...]
) -> TrustAnchor:
    doc: dict[str, Any] = {"name": name, "kind": "key" if key else "ca"}
    doc["pem"] = _read(key or args.ca, "key file" if key else "CA file")
    if args.intermediates:
        doc["intermediates"] = _read(args.intermediates, "intermediates file")
    if ids := _identities(args):
        doc["identities"] = [i.to_dict() for i in ids]
    if args.rekor_key:
        doc["rekor_public_key"] = _read(args.rekor_key, "Rekor key file")
    doc["require_tlog"] = args.require_tlog
    doc["strict_identity"] = args.strict_identity
    if getattr(args, "any_identity", False):
        doc["any_identity"] = True
    doc["scope"] = list(scope)
    from agent.core.schemas import validate
    from agent.verify.schemes import validator_for

    validate(doc, "policy", f"trust anchor {name!r}", entry="trust_anchor")
    anchor = TrustAnchor.from_dict(doc, f"trust anchor {name!r}")
    validator_for(anchor).check_anchor(anchor)  # refuse unusable key material before anything changes
    return anchor


def _flag_name(kind: str, path: str) -> str:
    """An anchor name for a key or CA given on the command line, e.g. ``key-cosign.pub``."""
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).name)[:58]


def _client(cfg: Config, args: argparse.Namespace, ref: ImageRef) -> Any:
    from agent.adapters.registry import RegistryClient

    extra = []
    if args.registry_username or args.registry_password_file:
        if not (args.registry_username and args.registry_password_file):
            raise InputError("--registry-username and --registry-password-file go together")
        base = cfg.registry(ref.registry)
        extra.append(
            RegistryConfig(
                host=ref.registry,
                username=args.registry_username,
                password_file=Path(args.registry_password_file),
                ca_bundle=base.ca_bundle if base else None,
                insecure=base.insecure if base else False,
            )
        )
    return RegistryClient(
        cfg, registries=extra, insecure_hosts=args.insecure_registry, docker_host=DockerHost()
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.adapters.store import Store
    from agent.control.service import Service
    from agent.runtime.verification import verify_reference

    cfg = load_config(args)
    ref = ImageRef.parse(args.image)
    if _identities(args) and not args.ca:
        # a key vouches for whoever holds it: certificate identities would be silently ignored
        raise InputError("--certificate-identity/--certificate-oidc-issuer[-regexp] apply to --ca only")
    if args.key or args.ca:
        anchors = [_anchor_from_flags(args, _flag_name("key", k), k, ("*",)) for k in args.key]
        if args.ca:
            anchors.append(_anchor_from_flags(args, _flag_name("ca", args.ca), None, ("*",)))
    else:
        policy = Service(cfg, Store(cfg.state_dir, create=False)).effective()
        anchors = list(policy.anchors_for(ref))
        if not anchors:
            raise InputError(
                f"no trust anchor of the device policy covers {ref.name}; pass --key or --ca, or add an anchor "
                "(imageguard anchors add)"
            )
    with _client(cfg, args, ref) as client:
        result = verify_reference(client, ref, anchors, now=time.time(), full_report=args.json)

    def text() -> str:
        if result.verified is not None:
            v = result.verified
            return f"VALID {ref.name}@{v.digest}\n  anchor:    {v.anchor}\n  signature: {v.origin}\n  signer:    {v.description}"
        verdict = "COULD NOT CHECK" if result.unreachable else "NOT VALID"
        return (
            f"{verdict} {ref}"
            + (f"@{result.digest}" if result.digest and not ref.digest else "")
            + "".join(f"\n  - {r}" for r in result.reasons)
        )

    emit(args, result.to_dict(), text)
    if result.verified is not None:
        return EXIT_OK
    # a registry that did not answer says nothing about the signature: not "not valid"
    return EXIT_UNAVAILABLE if result.unreachable else EXIT_NEGATIVE


def cmd_sign(args: argparse.Namespace) -> int:
    from agent.adapters.registry import Repository
    from agent.adapters.signatures import attach_signature, signature_tag
    from agent.verify.cosign.keys import load_private_key
    from agent.verify.cosign.payload import docker_reference_for
    from agent.verify.cosign.sign import sign_image

    cfg = load_config(args)
    ref = ImageRef.parse(args.image)
    pem_text = _read(args.key, "key file") or ""
    key = load_private_key(
        pem_text,
        _password(args.passphrase_file) if "ENCRYPTED" in pem_text else "",
        f"key {args.key}",
    )
    with _client(cfg, args, ref) as client:
        digest = client.resolve(ref)
        signature = sign_image(digest, docker_reference_for(ref), key)
        manifest = attach_signature(client, ref, digest, signature)
    data = {
        "image": f"{ref.name}@{digest}",
        "signature_tag": f"{Repository.of(ref)}:{signature_tag(digest)}",
        "signature_manifest": str(manifest),
    }
    emit(args, data, f"signed {data['image']}\n  pushed {data['signature_tag']}")
    return EXIT_OK


def cmd_generate_key_pair(args: argparse.Namespace) -> int:
    from agent.verify.cosign.keys import generate_key_pair

    key_path = Path(f"{args.output_key_prefix}.key")
    pub_path = Path(f"{args.output_key_prefix}.pub")
    for path in (key_path, pub_path):
        if path.exists() and not args.force:
            raise InputError(f"{path} exists; use --force to overwrite it")
    for path in (key_path, pub_path):
        if path.is_symlink():
            raise InputError(f"{path} is a symbolic link; refusing to write a key through it")
    private_pem, public_pem = generate_key_pair(_password(args.passphrase_file, confirm=True))
    _write_private(key_path, private_pem, 0o600)
    _write_private(pub_path, public_pem, 0o644)
    emit(
        args,
        {"private_key": str(key_path), "public_key": str(pub_path)},
        f"Private key written to {key_path}\nPublic key written to {pub_path}",
    )
    return EXIT_OK


def _service(args: argparse.Namespace, *, reading: bool = False) -> Service:
    from agent.app import policy_service

    return policy_service(load_config(args), reading=reading)


def cmd_anchors_list(args: argparse.Namespace) -> int:
    service = _service(args, reading=True)
    anchors = []
    for layer in service.store.layers():
        for a in layer.trust_anchors:
            anchors.append({**a.to_dict(), "layer": layer.name, "fingerprint": a.fingerprint})
    emit(
        args,
        {"trust_anchors": anchors},
        lambda: (
            format_table(
                ("NAME", "KIND", "LAYER", "TLOG", "SCOPE"),
                (
                    (
                        a["name"],
                        a["kind"],
                        a["layer"],
                        "required" if a["require_tlog"] else "-",
                        ", ".join(a["scope"]),
                    )
                    for a in anchors
                ),
            )
            if anchors
            else "no trust anchors"
        ),
    )
    return EXIT_OK


def cmd_anchors_add(args: argparse.Namespace) -> int:
    if _identities(args) and not args.ca:
        raise InputError("--certificate-identity/--certificate-oidc-issuer[-regexp] apply to --ca only")
    anchor = _anchor_from_flags(args, args.name, args.key, tuple(args.scope) or ("**",))
    warn_issuer_only([anchor])
    result = _service(args).put_anchor(anchor)
    emit(
        args,
        result.to_dict(),
        f"trust anchor {anchor.name!r} set; device layer is now version {result.version}",
    )
    return EXIT_OK


def cmd_anchors_remove(args: argparse.Namespace) -> int:
    try:
        result = _service(args).delete_anchor(args.name)
    except NotFound as exc:
        emit(args, {"error": {"code": exc.code, "message": str(exc)}}, f"imageguard: {exc}")
        return EXIT_NEGATIVE
    emit(
        args,
        result.to_dict(),
        f"trust anchor {args.name!r} removed ({result.revoked} verified digests revoked); "
        f"device layer is now version {result.version}",
    )
    return EXIT_OK
