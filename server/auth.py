"""Optional API keys for the gateway: `Authorization: Bearer <key>`.

Keys come from the environment variable `LDM_API_KEYS` (comma-separated) and/or a file
(`--api-keys-file`: one key per line; blank lines and lines starting with `#` are skipped).
No keys: the API is open. Keys are kept only as SHA-256 digests and a presented key is compared
with every one of them with `hmac.compare_digest`, so the time taken says nothing about which
key, or how much of one, matched. `KeyChecker.refusal` looks at the `Authorization` header only,
so the gateway decides before it reads a request's body.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

ENV_VAR = "LDM_API_KEYS"


def load_api_keys(file: str | Path | None = None,
                  env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The keys of `env[LDM_API_KEYS]` and of `file`, together."""
    env = os.environ if env is None else env
    keys = {k.strip() for k in env.get(ENV_VAR, "").split(",")}
    if file is not None:
        for line in Path(file).read_text(encoding="utf-8").splitlines():
            if not line.lstrip().startswith("#"):
                keys.add(line.strip())
    keys.discard("")
    bad = [k for k in keys if any(c.isspace() for c in k)]
    if bad:
        raise ValueError(f"{len(bad)} API key(s) contain whitespace")
    return frozenset(keys)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyChecker:
    """Checks presented keys against a fixed set."""

    def __init__(self, keys: Iterable[str]):
        self._digests = tuple(_digest(k) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: str) -> bool:
        digest = _digest(presented)
        ok = False
        for d in self._digests:  # no early exit: every key is compared
            ok |= hmac.compare_digest(digest, d)
        return ok

    def refusal(self, authorization: str | None) -> tuple[str, str] | None:
        """None when the `Authorization` header value lets the request in, else (code,
        message): "missing_api_key" or "invalid_api_key"."""
        if not self.enabled:
            return None
        key = bearer_key(authorization)
        if key is None:
            return ("missing_api_key",
                    "missing API key: send the header 'Authorization: Bearer <key>'")
        if not self.check(key):
            return "invalid_api_key", "invalid API key"
        return None


def bearer_key(authorization: str | None) -> str | None:
    """The key of an 'Authorization: Bearer <key>' header value (as fastapi's HTTPBearer reads
    it); None when there is none or the scheme is another."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None
