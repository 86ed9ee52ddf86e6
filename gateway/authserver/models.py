"""What the authorization server keeps: clients, their token policy, grants, users.

A client's record is the same Redis hash the gateway governs (``{prefix}client:{id}``):
the contract's ``disabled`` and ``scopes`` fields mean the same thing to both, so
disabling a client here refuses its tokens at the gateway at once, and vice versa.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

GRANT_CODE = "authorization_code"
GRANT_DEVICE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_REFRESH = "refresh_token"
#: RFC 6749 section 4.4: a machine, no person behind it
GRANT_CLIENT_CREDENTIALS = "client_credentials"
FLOW_NAMES = {"authorization_code": GRANT_CODE, "device_code": GRANT_DEVICE,
              GRANT_DEVICE: GRANT_DEVICE, "client_credentials": GRANT_CLIENT_CREDENTIALS}

#: the scope of the JSON admin API; only a person with the admin role may approve it, and
#: it is never granted by default: a client asks for it by name
ADMIN_SCOPE = "gateway:admin"
#: the public device-flow client every built-in server has (created at start if missing)
CLI_CLIENT_ID = "oauth-gateway-cli"

MAX_REDIRECT_URIS = 60
MAX_REFRESH_TTL = 365 * 24 * 3600
ROTATABLE, NON_ROTATABLE = "rotatable", "non_rotatable"


class ModelError(ValueError):
    """A client or policy value is not acceptable; the message says which and why."""


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """How long tokens live and how refresh tokens behave (per client, tenant defaults)."""

    access_token_ttl: int = 35 * 60          # Anaplan's default
    refresh_mode: str = ROTATABLE            # rotatable (single use) | non_rotatable
    refresh_token_ttl: int = 43_200          # rotatable default, up to a year
    idle_timeout: int = 0                    # seconds without use that end a grant; 0: none
    grant_max_lifetime: int = MAX_REFRESH_TTL  # absolute cap on a grant's life

    def validate(self) -> TokenPolicy:
        if not 60 <= self.access_token_ttl <= 24 * 3600:
            raise ModelError("access token lifetime must be between 60 and 86400 seconds")
        if self.refresh_mode not in (ROTATABLE, NON_ROTATABLE):
            raise ModelError("refresh mode must be rotatable or non_rotatable")
        if not 60 <= self.refresh_token_ttl <= MAX_REFRESH_TTL:
            raise ModelError(f"refresh token lifetime must be between 60 and {MAX_REFRESH_TTL}"
                             " seconds (one year)")
        if self.idle_timeout < 0:
            raise ModelError("idle timeout must be 0 (none) or positive")
        if not 60 <= self.grant_max_lifetime <= MAX_REFRESH_TTL:
            raise ModelError("grant maximum lifetime must be between 60 seconds and one year")
        return self

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_fields(cls, data: dict[str, str], defaults: TokenPolicy) -> TokenPolicy:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = data.get(f.name)
            if raw is None or raw == "":
                continue
            values[f.name] = raw if f.name == "refresh_mode" else int(raw)
        return replace(defaults, **values)


def check_redirect_uri(uri: str) -> str:
    """Absolute, no fragment, https except on loopback (RFC 8252 section 7.3)."""
    parts = urlsplit(uri)
    if parts.fragment or not parts.scheme or not parts.netloc:
        raise ModelError(f"redirect URI {uri!r}: must be absolute, without a fragment")
    host = (parts.hostname or "").lower()
    loopback = host in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ModelError(f"redirect URI {uri!r}: must use https (http only on loopback)")
    return uri


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """A self-service OAuth client. One flow per client, as Anaplan does."""

    client_id: str
    name: str
    grant_type: str
    redirect_uris: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    confidential: bool = False
    secret_hash: str = ""
    old_secret_hash: str = ""
    old_secret_expires_at: int = 0
    disabled: bool = False
    #: a resource server: may introspect any token (RFC 7662 section 2.1), not only its own
    introspect: bool = False
    policy: TokenPolicy = field(default_factory=TokenPolicy)
    created_at: int = 0
    created_by: str = ""

    @property
    def flow(self) -> str:
        if self.grant_type == GRANT_DEVICE:
            return "device_code"
        if self.grant_type == GRANT_CLIENT_CREDENTIALS:
            return "client_credentials"
        return "authorization_code"

    @property
    def machine(self) -> bool:
        """A machine client (RFC 6749 section 4.4): its tokens speak for no person."""
        return self.grant_type == GRANT_CLIENT_CREDENTIALS

    def validate(self) -> OAuthClient:
        if not self.name.strip():
            raise ModelError("a client needs a name")
        if self.grant_type not in (GRANT_CODE, GRANT_DEVICE, GRANT_CLIENT_CREDENTIALS):
            raise ModelError("grant must be authorization_code, device_code or "
                             "client_credentials")
        if self.grant_type == GRANT_CODE and not self.redirect_uris:
            raise ModelError("an authorization_code client needs at least one redirect URI")
        if self.grant_type != GRANT_CODE and self.redirect_uris:
            raise ModelError(f"a {self.flow} client has no redirect URIs")
        if len(self.redirect_uris) > MAX_REDIRECT_URIS:
            raise ModelError(f"at most {MAX_REDIRECT_URIS} redirect URIs")
        for uri in self.redirect_uris:
            check_redirect_uri(uri)
        if self.grant_type == GRANT_DEVICE and self.confidential:
            raise ModelError("device_code clients are public (RFC 8628 section 5.6)")
        if self.introspect and not self.confidential:
            raise ModelError("only a confidential client may introspect: introspection "
                             "needs a secret (RFC 7662 section 2.1)")
        if self.machine and not self.confidential:
            raise ModelError("client_credentials clients are confidential: the secret is "
                             "all they have (RFC 6749 section 4.4)")
        self.policy.validate()
        return self

    def to_fields(self) -> dict[str, str]:
        return {
            "managed": "1", "name": self.name, "grant_type": self.grant_type,
            "redirect_uris": json.dumps(list(self.redirect_uris)),
            "scopes": " ".join(self.scopes), "confidential": "1" if self.confidential else "0",
            "secret_hash": self.secret_hash, "old_secret_hash": self.old_secret_hash,
            "old_secret_expires_at": str(self.old_secret_expires_at),
            "disabled": "1" if self.disabled else "0",
            "introspect": "1" if self.introspect else "0", "created_at": str(self.created_at),
            "created_by": self.created_by, **self.policy.to_fields(),
        }

    @classmethod
    def from_fields(cls, client_id: str, data: dict[str, str], defaults: TokenPolicy
                    ) -> OAuthClient | None:
        """None when the hash is no client of this server (absent, or governance-only)."""
        if data.get("managed") != "1":
            return None
        return cls(
            client_id=client_id, name=data.get("name", ""),
            grant_type=data.get("grant_type", GRANT_CODE),
            redirect_uris=tuple(json.loads(data.get("redirect_uris") or "[]")),
            scopes=tuple((data.get("scopes") or "").split()),
            confidential=data.get("confidential") == "1",
            secret_hash=data.get("secret_hash", ""),
            old_secret_hash=data.get("old_secret_hash", ""),
            old_secret_expires_at=int(data.get("old_secret_expires_at") or 0),
            disabled=data.get("disabled", "0").strip() == "1",
            introspect=data.get("introspect") == "1",
            policy=TokenPolicy.from_fields(data, defaults),
            created_at=int(data.get("created_at") or 0), created_by=data.get("created_by", ""),
        )

    def public_view(self) -> dict[str, Any]:
        """What ``clients show`` prints: never a secret hash."""
        return {
            "client_id": self.client_id, "name": self.name, "flow": self.flow,
            "grant_type": self.grant_type, "redirect_uris": list(self.redirect_uris),
            "scopes": list(self.scopes), "confidential": self.confidential,
            "disabled": self.disabled, "introspect": self.introspect, "policy": {
                f.name: getattr(self.policy, f.name) for f in fields(self.policy)},
            "secret_rotation_grace_until": self.old_secret_expires_at or None,
            "created_at": self.created_at, "created_by": self.created_by,
        }


@dataclass(frozen=True, slots=True)
class Grant:
    """One authorization: user + client + device. Revoking it ends that device only.

    A machine client's (``client_credentials``) has no user: one standing grant per
    client, no ``username``, no ``sub``; each token request reuses it while it lives."""

    grant_id: str
    client_id: str
    username: str
    sub: str
    scope: str
    grant_type: str
    label: str = ""
    created_at: int = 0
    last_used_at: int = 0
    expires_at: int = 0
    revoked: bool = False
    revoked_reason: str = ""

    def to_fields(self) -> dict[str, str]:
        return {f.name: (("1" if getattr(self, f.name) else "0")
                         if isinstance(getattr(self, f.name), bool)
                         else str(getattr(self, f.name))) for f in fields(self)}

    @classmethod
    def from_fields(cls, data: dict[str, str]) -> Grant | None:
        if not data.get("grant_id"):
            return None
        return cls(
            grant_id=data["grant_id"], client_id=data.get("client_id", ""),
            username=data.get("username", ""), sub=data.get("sub", ""),
            scope=data.get("scope", ""), grant_type=data.get("grant_type", ""),
            label=data.get("label", ""), created_at=int(data.get("created_at") or 0),
            last_used_at=int(data.get("last_used_at") or 0),
            expires_at=int(data.get("expires_at") or 0), revoked=data.get("revoked") == "1",
            revoked_reason=data.get("revoked_reason", ""),
        )

    def ends_at(self, policy: TokenPolicy) -> float:
        """When the grant ends unless it is used again: at its maximum lifetime, or
        ``idle_timeout`` after its last use, whichever comes first (``inf``: neither).

        A use is a token exchange: the grant's creation, then each refresh. Presenting an
        access token (to the gateway, or to the introspection endpoint) is no use: the
        idle clock measures how long the client has not come back for tokens."""
        end = float(self.expires_at) if self.expires_at else float("inf")
        if policy.idle_timeout and self.last_used_at:
            end = min(end, float(self.last_used_at + policy.idle_timeout))
        return end

    def alive(self, policy: TokenPolicy, now: float | None = None) -> bool:
        """Not revoked, and before :meth:`ends_at`: what every token of it needs to be
        active, at the gateway and at the introspection endpoint alike."""
        now = time.time() if now is None else now
        return not self.revoked and now < self.ends_at(policy)


#: OpenID scopes that clients written for Anaplan send (Anaplan grants them): accepted and
#: ignored here, so they neither widen nor narrow a grant
IGNORED_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})


def requested_scopes(requested: str | None) -> list[str]:
    """The scopes asked for, less :data:`IGNORED_SCOPES`."""
    return [s for s in (requested or "").split() if s not in IGNORED_SCOPES]


def narrow_scope(requested: str | None, allowed: tuple[str, ...]) -> str:
    """Requested scopes must be a subset of the client's (RFC 6749 section 3.3);
    none requested means all of them but :data:`ADMIN_SCOPE`, which is asked by name."""
    from gateway.authserver.errors import InvalidScope

    wanted = requested_scopes(requested)
    if not wanted:
        return " ".join(s for s in allowed if s != ADMIN_SCOPE)
    unknown = [s for s in wanted if s not in allowed]
    if unknown:
        raise InvalidScope(f"scope not allowed for this client: {' '.join(unknown)}")
    return " ".join(dict.fromkeys(wanted))
