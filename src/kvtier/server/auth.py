"""Tenants: API keys mapped to tenant names, and the cache salt each request runs under.

A tenant's name salts the root of its block keys, so two tenants never share a KV block: no tenant can
learn another's prompts from cache hits or their timing. A request's ``cache_salt`` narrows that further
(within one tenant). Keys are compared in constant time, against every configured key, so neither the
answer's timing nor its content tells how much of a guessed key was right.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvtier.engine.request import check_cache_salt

DEFAULT_TENANT = "default"
MAX_TENANT_CHARS = 256  # the salted form stays well under the engine's cache_salt limit
_SEP = "\x1f"  # cannot occur in a tenant name read from a keys file (control character)


class AuthError(Exception):
    """A missing or unknown API key (HTTP 401)."""


@dataclass(frozen=True)
class Tenants:
    """API key digest -> tenant name. Empty: the server is open and requests carry no tenant."""

    by_digest: dict[bytes, str]

    @property
    def enabled(self) -> bool:
        return bool(self.by_digest)

    @classmethod
    def build(cls, api_key: str | None = None, keys_file: str | None = None) -> Tenants:
        keys: dict[str, str] = {}
        if api_key:
            keys[api_key] = DEFAULT_TENANT
        if keys_file:
            keys.update(read_keys_file(keys_file))
        return cls({_digest(k): t for k, t in keys.items()})

    def authenticate(self, authorization: str | None) -> str | None:
        """The tenant of an ``Authorization: Bearer <key>`` header; None when the server is open."""
        if not self.enabled:
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        # Digests have one length whatever the key's, and every entry is compared: the time taken
        # depends on neither which key matched nor how much of a wrong key was right.
        given = _digest(authorization[7:].strip())
        tenant = None
        for digest, name in self.by_digest.items():
            if hmac.compare_digest(digest, given):
                tenant = name
        if tenant is None:
            raise AuthError("invalid API key")
        return tenant


def cache_salt(tenant: str | None, request_salt: str | None) -> str | None:
    """The salt a request's block keys are made with: its tenant, narrowed by its own cache_salt.

    The request's salt is checked as sent (its error names its own length and limit, not the
    tenant's), then enters as a digest: the salted form has one length whatever the salt's, so a
    salt at the engine's limit still fits beside any tenant name."""
    salt = check_cache_salt(request_salt)
    if tenant is None:
        return salt or None
    if not salt:
        return f"tenant{_SEP}{tenant}"
    return f"tenant{_SEP}{tenant}{_SEP}{hashlib.sha256(salt.encode()).hexdigest()}"


def read_keys_file(path: str) -> dict[str, str]:
    """A mapping ``key: tenant`` in YAML or JSON, or lines ``<key> <tenant>`` (``#`` comments)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        data = None
    if not isinstance(data, dict):
        data = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected '<key> <tenant>', got {line!r}")
            data[parts[0]] = parts[1]
    out = {str(k): str(v) for k, v in data.items()}
    for key, tenant in out.items():
        if not key or not tenant or any(ord(c) < 32 for c in tenant):
            raise ValueError(f"{path}: empty key or tenant name, or a control character in {tenant!r}")
        if len(tenant) > MAX_TENANT_CHARS:
            raise ValueError(
                f"{path}: the tenant name {tenant[:40]!r}... has {len(tenant)} characters; "
                f"at most {MAX_TENANT_CHARS}"
            )
    if not out:
        raise ValueError(f"{path}: no API keys in the file")
    return out


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
