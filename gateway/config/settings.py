"""Settings: defaults, overridden by a YAML config file, overridden by environment variables.

Every setting has a default. The YAML file uses the lower-case name without the
``GATEWAY_`` prefix (``redis_url: redis://...``); the environment uses the upper-case
name with it (``GATEWAY_REDIS_URL``).

Each setting is described once, by its field in :class:`Settings`: name, type, default,
help text and bounds (``setting(...)``, see ``gateway.config.spec``). The checks below, the
README's settings table and the Helm chart's ``config`` schema all come from there;
``python tools/gen_settings.py --write`` rewrites the table and the schema.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config.spec import (
    HTTP_URL,
    REDIS_URL,
    Described,
    UrlRule,
    describe,
    setting,
    split_hostport,
)

__all__ = ["Settings", "SettingsError", "described", "env_name", "load_settings",
           "parse_hostport", "settings_markdown", "settings_table"]

_VALIDATORS = ("auto", "introspection", "jwt", "anaplan", "builtin")
# every name logging.setLevel accepts (the value is upper-cased first)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "WARN", "FATAL", "NOTSET")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the gateway. Field names map to ``GATEWAY_<NAME>`` variables."""

    listen: str = setting(
        "0.0.0.0:8080", "host:port of the proxy listener (client traffic, `/oauth/*`)",
        hostport=True)
    admin_listen: str = setting(
        "127.0.0.1:9090",
        "host:port of the operator listener: `/metrics`, `/healthz`, `/readyz`", hostport=True)
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis (or Valkey) URL; `rediss://` for TLS; "
        "`redis+sentinel://host:26379[,host:26379]/service[/db]` for Redis Sentinel; "
        "`redis+cluster://host:6379[,host:6379]` for Redis Cluster (`rediss+` for TLS)",
        url=REDIS_URL)
    key_prefix: str = setting("gw:", "prefix of every Redis key the project writes")
    policies: str = setting("policies/", "a policy file, or a folder of `*.yaml` policy files")
    validator: str = setting(
        "auto",
        "`introspection`, `jwt`, `anaplan`, `builtin`, or `auto` (introspection when "
        "`GATEWAY_INTROSPECTION_URL` is set, else jwt when `GATEWAY_JWKS_URL` is set, "
        "else anaplan when `GATEWAY_ANAPLAN_VALIDATE_URL` is set, else builtin when "
        "`GATEWAY_ISSUER` is set)", choices=_VALIDATORS)
    introspection_url: str = setting(
        "", "RFC 7662 endpoint of an external authorization server", url=HTTP_URL)
    introspection_client_id: str = setting(
        "", "client id the gateway presents at the introspection endpoint (client_secret_basic)")
    introspection_client_secret: str = setting(
        "", "client secret the gateway presents at the introspection endpoint")
    revocation_url: str = setting(
        "", "RFC 7009 endpoint used by `oauth-gateway tokens revoke` (same credentials)",
        url=HTTP_URL)
    introspection_timeout: float = setting(
        2.0, "total seconds for one call to the authorization server", minimum=0)
    introspection_retries: int = setting(
        2, "extra attempts on connection errors and 5xx only, with exponential backoff",
        minimum=0)
    jwks_url: str = setting("", "JWKS URL for local JWT validation", url=HTTP_URL)
    jwt_issuer: str = setting("", "required `iss` of JWT access tokens")
    jwt_audience: str = setting(
        "", "required `aud` of JWT access tokens (empty: `aud` not checked)")
    jwt_algorithms: str = setting(
        "RS256 ES256 PS256 EdDSA",
        "space-separated allow-list of JWS algorithms (asymmetric only)")
    jwt_leeway: int = setting(
        30, "seconds of clock skew allowed on `exp`, `nbf`, `iat`", minimum=0)
    anaplan_validate_url: str = setting(
        "", "Anaplan's token-validate endpoint, e.g. `https://auth.anaplan.com/token/validate`",
        url=HTTP_URL)
    issuer: str = setting(
        "", "issuer URL of the built-in authorization server; setting it enables that server",
        url=HTTP_URL)
    as_access_token_ttl: int = setting(
        2100, "built-in server: default access-token lifetime in seconds (35 minutes)",
        minimum=0)
    as_refresh_mode: str = setting(
        "rotatable",
        "built-in server: default refresh-token mode, `rotatable` or `non_rotatable`",
        choices=("rotatable", "non_rotatable"))
    as_refresh_token_ttl: int = setting(
        43200, "built-in server: default refresh-token lifetime in seconds (up to one year)",
        minimum=0)
    as_idle_timeout: int = setting(
        0, "built-in server: default seconds without use that end a grant (0: none)",
        minimum=0, zero="none")
    as_grant_max_lifetime: int = setting(
        31536000, "built-in server: default absolute cap on a grant's life, in seconds",
        minimum=0)
    as_access_token_format: str = setting(
        "opaque", "built-in server: `opaque` or `jwt` (RFC 9068, signed with keys it rotates)",
        choices=("opaque", "jwt"))
    as_local_login: bool = setting(
        True, "built-in server: offer the local username/password login")
    as_open_introspection: bool = setting(
        False, "built-in server: any confidential client may introspect any token (the "
        "older rule); false: only clients created with `--introspect`, others learn only "
        "about their own tokens")
    sso_issuer: str = setting(
        "", "OpenID Connect provider for single sign-on (its issuer URL); empty: no SSO",
        url=HTTP_URL)
    sso_client_id: str = setting("", "the built-in server's client id at the OpenID provider")
    sso_client_secret: str = setting(
        "", "the built-in server's client secret at the OpenID provider")
    sso_scopes: str = setting("openid profile email", "scopes asked of the OpenID provider")
    sso_username_claim: str = setting(
        "preferred_username", "ID-token claim that names the user (falls back to `sub`)")
    admin_groups: str = setting(
        "", "comma-separated groups of the ID token's `groups` claim whose members get the "
        "built-in server's admin role at each SSO sign-in (empty: SSO leaves the role as "
        "set by `users add --admin`)")
    display_name: str = setting(
        "oauth-gateway", "the service's name on the built-in server's pages (sign-in, "
        "consent, device, account, console); a tenant setting overrides it")
    logo_url: str = setting(
        "", "https URL of a logo the built-in server's pages show (the pages' CSP then "
        "allows images from its origin); empty: none; a tenant setting overrides it",
        url=UrlRule(("https",), "an https:// URL"))
    anaplan_oauth_url: str = setting(
        "https://us1a.app.anaplan.com",
        "Anaplan's OAuth service (`/auth/authorize`, `/oauth/token`): \"Sign in with "
        "Anaplan\" on the built-in server, and the refresh of `credentials: user` tokens",
        url=HTTP_URL)
    anaplan_auth_url: str = setting(
        "https://auth.anaplan.com",
        "Anaplan's token service; its `/token/validate` names the person who signed in",
        url=HTTP_URL)
    anaplan_client_id: str = setting(
        "", "the built-in server's OAuth client id at Anaplan; set (with the secret) to offer "
        "\"Sign in with Anaplan\"")
    anaplan_client_secret: str = setting(
        "", "the built-in server's OAuth client secret at Anaplan")
    require_client_record: bool = setting(
        False, "`true`: refuse tokens of clients that have no record in Redis")
    log_format: str = setting("json", "`json` or `text`", choices=("json", "text"))
    log_level: str = setting("INFO", "Python log level", choices=_LOG_LEVELS, any_case=True)
    access_log: bool = setting(True, "one line per request on standard output")
    token_digest_key: str = setting(
        "", "secret key (hex or text) of the keyed BLAKE2b token digest; empty: one random key "
        "is created once in Redis (`gw:meta:digest_key`) and shared by the fleet")
    secret_keys: str = setting(
        "", "comma-separated base64 32-byte keys (AES-256-GCM) that encrypt what the gateway "
        "keeps in Redis for `credentials: service` and `user` upstreams; the first encrypts, all "
        "decrypt (rotation: add the new key first, run `oauth-gateway secret-keys reseal`, then "
        "drop the old one); required when a policy uses `service` or `user`")
    local_cache_ttl: float = setting(
        5.0, "seconds a validation result lives in the in-process layer", above=0)
    local_cache_size: int = setting(
        100_000, "entries in the in-process layer (least recently used evicted)", above=0)
    cache_max_ttl: int = setting(
        300, "most seconds an active result lives in Redis (never beyond the token's `exp`)",
        above=0)
    negative_cache_ttl: int = setting(
        10, "seconds an inactive result is cached, so bad tokens cannot flood the AS", above=0)
    client_refresh_interval: float = setting(
        0.5, "seconds between re-reads of known client records (the `redis-cli` safety net)",
        above=0)
    keyspace_notifications: bool = setting(
        True, "ask Redis (CONFIG SET, best effort) for keyspace notifications on hashes, so a "
        "`redis-cli HSET` on a client record reaches every replica in milliseconds")
    redis_allow_eviction: bool = setting(
        False, "`true`: start the built-in server even though Redis's `maxmemory-policy` "
        "can evict its clients, users, grants and tokens (anything but `noeviction`); "
        "`false` refuses to start")
    ready_requires_redis: bool = setting(
        False, "`true`: `/readyz` fails while Redis is down")
    max_body_size: int = setting(
        100 * 1024 * 1024, "largest request body forwarded, in bytes (413 beyond)", above=0)
    max_auth_header: int = setting(
        8192, "largest `Authorization` header accepted, in bytes (400 beyond)", above=0)
    upstream_connect_timeout: float = setting(
        5.0, "seconds to get an upstream connection: a free pool slot, TCP connect and TLS "
        "handshake (502 beyond; 0: no limit)", minimum=0, zero="no limit")
    upstream_timeout: float = setting(
        60.0, "seconds an upstream may stay silent: before its response headers 504, after "
        "them the stream is cut (0: no limit)", minimum=0, zero="no limit")
    upstream_pool_size: int = setting(
        256, "open upstream connections per replica (kept alive and reused; beyond it "
        "requests wait for one; 0: no limit)", minimum=0, zero="no limit")
    client_body_timeout: float = setting(
        60.0, "seconds a client may pause while sending a request body (408 beyond, and the "
        "upstream connection is let go; 0: no limit)", minimum=0, zero="no limit")
    shutdown_timeout: float = setting(
        20.0, "seconds in-flight requests get to finish on SIGTERM", minimum=0)
    usage_window: int = setting(
        3600, "seconds of the fleet-wide token-usage window per client", minimum=0)
    usage_flush_interval: float = setting(
        1.0, "seconds between writes of this replica's usage counts to Redis", above=0)
    default_rate_limit: str = setting(
        "", "limit for clients whose record sets none, e.g. `600/60s`; empty: none",
        rate=True)
    trusted_proxies: int = setting(
        0, "how many proxies in front of the gateway append to `X-Forwarded-For` "
        "(0: the client's own address is used)", minimum=0)
    workers: int = setting(
        1, "number of worker processes sharing the listener with SO_REUSEPORT; worker `i` "
        "serves its own admin listener on the admin port + `i`", above=0)
    header_timeout: float = setting(
        10, "seconds a client may take to send a request's headers, counted from the "
        "connection's opening or the request's first byte, however slowly they trickle in "
        "(the connection is closed beyond)", above=0)
    keepalive_timeout: float = setting(
        75, "seconds an idle keep-alive connection stays open", above=0)
    max_connections: int = setting(
        10000, "open client connections per process; past it, new ones are answered 503 and "
        "closed at once (lowered at start when the open-file limit leaves less room)", above=0)

    @property
    def resolved_validator(self) -> str:
        """The validator ``auto`` resolves to, or the explicit one."""
        if self.validator != "auto":
            return self.validator
        if self.introspection_url:
            return "introspection"
        if self.jwks_url:
            return "jwt"
        if self.anaplan_validate_url:
            return "anaplan"
        if self.issuer:
            return "builtin"
        return "none"


def described() -> tuple[Described, ...]:
    """Every setting as declared on :class:`Settings`, in declaration order."""
    return describe(Settings)


def env_name(field_name: str) -> str:
    """``redis_url`` -> ``GATEWAY_REDIS_URL``."""
    return "GATEWAY_" + field_name.upper()


def _convert(name: str, kind: type, raw: Any) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise SettingsError(f"{name}: expected true or false, got {raw!r}")
    if kind is int:
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    return str(raw)


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from defaults, a YAML file, the environment, then overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    kinds = {d.name: d.kind for d in described()}
    config_file = config_file or env.get("GATEWAY_CONFIG") or None
    if config_file:
        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of setting names to values")
        for key, raw in data.items():
            name = str(key).lower().removeprefix("gateway_")
            if name not in kinds:
                raise SettingsError(f"{path}: unknown setting {key!r}")
            values[name] = _convert(f"{path}: {key}", kinds[name], raw)
    for name, kind in kinds.items():
        var = env_name(name)
        if var in env:
            values[name] = _convert(var, kind, env[var])
    for name, raw in overrides.items():
        if name not in kinds:
            raise SettingsError(f"unknown setting {name!r}")
        values[name] = raw
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    """The bounds each setting declares; the first value out of bounds is reported."""
    for d in described():
        problem = d.spec.problem(getattr(s, d.name))
        if problem is not None:
            raise SettingsError(f"{env_name(d.name)}: {problem}")


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:8080``)."""
    split = split_hostport(value)
    if split is None:
        raise SettingsError(f"{what}: expected host:port, got {value!r}")
    return split


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, meaning, default) rows for documentation."""
    rows = []
    for d in described():
        shown = ("(empty)" if d.default == "" else str(d.default).lower()
                 if isinstance(d.default, bool) else str(d.default))
        rows.append((env_name(d.name), d.spec.doc, shown))
    return rows


def settings_markdown() -> str:
    """The README's settings table (Markdown), one row per setting."""
    lines = ["| variable | meaning | default |", "|---|---|---|"]
    lines += [f"| `{var}` | {doc} | `{shown}` |" for var, doc, shown in settings_table()]
    return "\n".join(lines) + "\n"
