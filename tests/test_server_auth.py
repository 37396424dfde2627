"""Tenants (kvtier/server/auth.py): every keys-file format, its errors, ``--api-key``, the
constant-time lookup answering only for a configured key, and the salt each request runs under."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.engine.request import InvalidRequestError
from kvtier.server.auth import MAX_TENANT_CHARS, AuthError, Tenants, cache_salt, read_keys_file

KEYS = {"key-a": "alpha", "key-b": "beta"}


@pytest.mark.parametrize(
    "text",
    [
        "key-a: alpha\nkey-b: beta\n",  # YAML
        json.dumps(KEYS),  # JSON
        "# keys\nkey-a alpha\n\nkey-b   beta  # the second\n",  # '<key> <tenant>' lines
    ],
    ids=["yaml", "json", "lines"],
)
def test_every_keys_file_format_reads_the_same(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    assert read_keys_file(str(path)) == KEYS
    tenants = Tenants.build(keys_file=str(path))
    assert tenants.authenticate("Bearer key-a") == "alpha"
    assert tenants.authenticate("bearer key-b") == "beta"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no API keys"),
        ("key-a alpha extra\n", "expected '<key> <tenant>'"),
        ('{"key-a": ""}', "empty key or tenant name"),
        ('{"key-a": "al\\u0007pha"}', "control character"),
        (json.dumps({"key-a": "t" * (MAX_TENANT_CHARS + 1)}), f"at most {MAX_TENANT_CHARS}"),
    ],
    ids=["empty", "three-words", "empty-tenant", "control-char", "long-tenant"],
)
def test_a_bad_keys_file_is_refused_naming_the_problem(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as e:
        read_keys_file(str(path))
    assert str(path) in str(e.value)  # which file


def test_api_key_and_unknown_keys() -> None:
    tenants = Tenants.build(api_key="secret")
    assert tenants.enabled and tenants.authenticate("Bearer secret") == "default"
    for header in (None, "", "Basic secret", "Bearer secre", "Bearer secrets", "Bearer "):
        with pytest.raises(AuthError):
            tenants.authenticate(header)
    assert Tenants.build().authenticate(None) is None  # an open server: no tenant


def test_the_salt_keeps_tenants_and_their_salts_apart() -> None:
    salts = {
        cache_salt(None, None),
        cache_salt(None, "s"),
        cache_salt("alpha", None),
        cache_salt("alpha", "s"),
        cache_salt("alpha", "t"),
        cache_salt("beta", None),
        cache_salt("beta", "s"),
    }
    assert len(salts) == 7  # no two of them share blocks
    assert cache_salt(None, None) is None and cache_salt(None, "") is None
    long_ok = cache_salt("t" * MAX_TENANT_CHARS, "s" * 1024)  # a salt at its limit, a long name
    assert long_ok is not None and len(long_ok) < 1024
    with pytest.raises(InvalidRequestError, match="cache_salt has 1025 characters; at most 1024"):
        cache_salt("alpha", "s" * 1025)
