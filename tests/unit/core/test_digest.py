"""Digests: the one form enforcement trusts, and every other form refused with a clear message."""

from __future__ import annotations

import hashlib

import pytest

from agent.core.digest import Digest
from agent.errors import DigestError, InputError

HEX = hashlib.sha256(b"imageguard").hexdigest()
CANONICAL = f"sha256:{HEX}"


@pytest.mark.parametrize(
    "text",
    [
        CANONICAL,
        CANONICAL.upper(),
        f"SHA256:{HEX.upper()}",
        f"  {CANONICAL}\n",
        f"\tsha256:{HEX[:32]} {HEX[32:]}",
        f"sha256 : {HEX[:10]}\n{HEX[10:]}",
        f"sha256:{HEX[:16]}\u00a0{HEX[16:]}",  # non-breaking space pasted from a web page
    ],
    ids=["canonical", "upper", "upper-algo", "outer-space", "inner-space", "space-around-colon", "nbsp"],
)
def test_parse_normalises_case_and_whitespace(text: str) -> None:
    d = Digest.parse(text)
    assert d.value == CANONICAL
    assert str(d) == CANONICAL
    assert d == Digest(CANONICAL)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "''"),
        ("   \n", "''"),
        ("sha256:", "'sha256:'"),
        (HEX, "64"),
        (f"sha512:{hashlib.sha512(b'x').hexdigest()}", "sha256"),
        (f"sha512:{HEX}", "sha256"),
        (f"md5:{HEX}", "sha256"),
        (f"sha256:{HEX[:-1]}", "64"),
        (f"sha256:{HEX}0", "64"),
        (f"sha256:{HEX[:-1]}g", "64"),
        (f"sha256:{HEX[:-1]}\u0661", "64"),  # an Arabic-Indic digit is a digit, but not hex
        (f"sha256:{HEX}:", "64"),
        (f"sha256::{HEX}", "64"),
        (f"sha256-{HEX}", "sha256"),
        (f"@sha256:{HEX}", "sha256"),
        (f"sha256:{HEX}@", "64"),
    ],
    ids=[
        "empty",
        "blank",
        "algo-only",
        "no-algo",
        "sha512",
        "sha512-with-64",
        "md5",
        "short",
        "long",
        "non-hex",
        "unicode-digit",
        "trailing-colon",
        "double-colon",
        "dash",
        "leading-at",
        "trailing-at",
    ],
)
def test_parse_rejects_other_forms(text: str, fragment: str) -> None:
    with pytest.raises(DigestError) as exc:
        Digest.parse(text)
    message = str(exc.value)
    assert message.startswith("invalid digest")
    assert "sha256:" in message  # says what was expected
    assert fragment in message
    assert exc.value.code == "invalid-digest"
    assert isinstance(exc.value, InputError)


@pytest.mark.parametrize("value", [None, 42, b"sha256:" + HEX.encode(), [CANONICAL], {"digest": CANONICAL}])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(DigestError, match="expected a string"):
        Digest.parse(value)


@pytest.mark.parametrize("value", [CANONICAL.upper(), f" {CANONICAL}", 7, None])
def test_constructor_accepts_only_the_canonical_form(value: object) -> None:
    # the constructor does not normalise: only parse() does
    with pytest.raises(DigestError):
        Digest(value)  # type: ignore[arg-type]


def test_error_quotes_only_the_start_of_huge_input() -> None:
    with pytest.raises(DigestError) as exc:
        Digest.parse("sha256:" + "z" * 1_000_000)
    assert len(str(exc.value)) < 300


def test_of_and_matches() -> None:
    d = Digest.of(b"imageguard")
    assert d.value == CANONICAL
    assert d.hex == HEX
    assert d.short == HEX[:12]
    assert d.matches(b"imageguard")
    assert not d.matches(b"imageguard ")


def test_digests_are_hashable_and_ordered() -> None:
    a, b = Digest.of(b"a"), Digest.of(b"b")
    assert len({a, Digest.parse(a.value.upper()), b}) == 2
    assert sorted([b, a]) == sorted([a, b])
