"""Route policies: ``policies/*.yaml`` loaded, validated against a schema, compiled.

Format (the keys docs/COMPATIBILITY.md promises to keep accepting)::

    upstreams:
      api: https://api.anaplan.com          # name -> base URL, or a mapping (below)
      audit:
        url: https://audit.anaplan.com
        credentials: forward                 # forward | strip | replace | service | user
        scheme: AnaplanAuthToken             # scheme the token is forwarded in
      admin:
        url: https://api.anaplan.com
        credentials: service                 # the gateway's own Anaplan sign-in
        identity: integration
      mine:
        url: https://api.anaplan.com
        credentials: user                    # the person's own Anaplan sign-in
    identities:                              # who the gateway signs in to Anaplan as
      integration:
        kind: anaplan-certificate            # or anaplan-basic (username_env, password_env)
        auth_url: https://auth.anaplan.com
        certificate_file: /etc/oauth-gateway/anaplan-cert.pem
        private_key_file: /etc/oauth-gateway/anaplan-key.pem
        certificate_payload: classic         # or v2 (timestamped signed data)
    routes:                                  # first match in file order wins
      - name: integration-read
        upstream: api
        methods: [GET, HEAD]
        path: /2/0/**                        # `*` one segment, `**` any number
        scopes: [anaplan:read]               # every one is required
        weight: 1                            # units of the client's rate limit a request uses

Several files are read in name order; their routes are concatenated in that order,
and an upstream or an identity may be defined once only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"}
_SCOPE = {"type": "string", "pattern": r"^[\x21\x23-\x5B\x5D-\x7E]+$"}  # RFC 6749 3.3

CREDENTIAL_MODES = ["forward", "strip", "replace", "service", "user"]
IDENTITY_KINDS = ["anaplan-certificate", "anaplan-basic"]
#: the keys each identity kind requires
IDENTITY_KEYS = {"anaplan-certificate": ("certificate_file", "private_key_file"),
                 "anaplan-basic": ("username_env", "password_env")}
#: the keys each identity kind may also have
IDENTITY_OPTIONAL = {"anaplan-certificate": ("certificate_payload",), "anaplan-basic": ()}
CERTIFICATE_PAYLOADS = ["classic", "v2"]
_TEXT = {"type": "string", "minLength": 1}

POLICY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "identities": {
            "type": "object",
            "propertyNames": _NAME,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["kind"],
                "properties": {
                    "kind": {"enum": IDENTITY_KINDS},
                    "auth_url": {"type": "string", "pattern": "^https?://"},
                    "certificate_file": _TEXT,
                    "private_key_file": _TEXT,
                    "username_env": _TEXT,
                    "password_env": _TEXT,
                    "certificate_payload": {"enum": CERTIFICATE_PAYLOADS},
                },
            },
        },
        "upstreams": {
            "type": "object",
            "propertyNames": _NAME,
            "additionalProperties": {
                "oneOf": [
                    {"type": "string", "pattern": "^https?://"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["url"],
                        "properties": {
                            "url": {"type": "string", "pattern": "^https?://"},
                            "credentials": {"enum": CREDENTIAL_MODES},
                            "identity": _NAME,
                            "scheme": {"enum": ["Bearer", "AnaplanAuthToken"]},
                            "replace_header": {"type": "string", "minLength": 1},
                            "replace_value_env": {"type": "string", "minLength": 1},
                            "timeout": {"type": "number", "exclusiveMinimum": 0},
                        },
                    },
                ]
            },
        },
        "routes": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "upstream", "path"],
                "properties": {
                    "name": _NAME,
                    "upstream": _NAME,
                    "methods": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"enum": HTTP_METHODS},
                    },
                    "path": {"type": "string", "pattern": r"^/"},
                    "scopes": {"type": "array", "items": _SCOPE},
                    "description": {"type": "string"},
                    "weight": {"type": "integer", "minimum": 1},
                },
            },
        },
    },
}


class PolicyError(ValueError):
    """A policy file is invalid. The message names the file, the route and the key."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the gateway signs in to Anaplan as, for upstreams with ``credentials: service``.

    ``anaplan-certificate`` reads ``certificate_file`` and ``private_key_file`` and signs
    the ``certificate_payload`` form (``classic``, or the timestamped ``v2``);
    ``anaplan-basic`` reads the user and password from the environment variables
    ``username_env`` and ``password_env``."""

    name: str
    kind: str
    auth_url: str = "https://auth.anaplan.com"
    certificate_file: str = ""
    private_key_file: str = ""
    username_env: str = ""
    password_env: str = ""
    certificate_payload: str = "classic"  # or "v2": the signed data starts with a timestamp


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where matched requests go and how the client's credentials travel there."""

    name: str
    url: str
    credentials: str = "forward"
    scheme: str = "Bearer"
    replace_header: str = "Authorization"
    replace_value_env: str = ""
    timeout: float | None = None
    identity: str = ""  # credentials: service

    @property
    def base_path(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


@dataclass(frozen=True, slots=True)
class Route:
    """One rule: methods + path pattern -> upstream, with the scopes it requires."""

    name: str
    upstream: Upstream
    methods: frozenset[str]
    path: str
    scopes: tuple[str, ...]
    source: str
    pattern: re.Pattern[str] = field(repr=False, compare=False)
    weight: int = 1  # units of the client's rate limit one request uses

    def matches_path(self, path: str) -> bool:
        return self.pattern.fullmatch(path) is not None


def compile_path(pattern: str) -> re.Pattern[str]:
    """``*`` matches one non-empty segment, ``**`` any number of segments (zero included).

    Literal segments match without regard to letter case, so that ``/IMPORTS`` is held
    to the route for ``/imports`` whether or not the upstream folds case."""
    segments = pattern.strip("/").split("/") if pattern.strip("/") else []
    regex = ""
    for i, seg in enumerate(segments):
        if seg == "**":
            # `/a/**` matches /a, /a/ and /a/b/c; a `**` in the middle matches zero or more
            regex += "(?:/.*)?" if i == len(segments) - 1 else "(?:/[^/]+)*"
            continue
        if "**" in seg:
            raise ValueError("`**` must be a whole segment")
        parts = [re.escape(p) for p in seg.split("*")]
        regex += "/" + "[^/]+".join(parts) if seg != "*" else "/[^/]+"
    if pattern.endswith("/") and segments and segments[-1] != "**":
        regex += "/"
    # ASCII: only A-Z fold, so the Kelvin sign is no `k` and a long s no `s`
    return re.compile(regex or "/", re.DOTALL | re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of matching a request: the route, or why there is none."""

    route: Route | None
    method_mismatch: bool = False


class RoutePolicy:
    """The compiled set of routes, matched first-wins in file order."""

    def __init__(self, routes: list[Route], upstreams: dict[str, Upstream],
                 sources: list[str], identities: dict[str, Identity] | None = None) -> None:
        self.routes = routes
        self.upstreams = upstreams
        self.sources = sources
        self.identities = identities or {}

    def match(self, method: str, path: str) -> Match:
        """First route whose method and path match ``path`` (already decoded and checked)."""
        path_only = False
        for route in self.routes:
            if route.pattern.fullmatch(path) is not None:
                if method in route.methods:
                    return Match(route)
                path_only = True
        return Match(None, method_mismatch=path_only)

    @property
    def route_names(self) -> list[str]:
        return [r.name for r in self.routes]


def _policy_files(location: str | Path) -> list[Path]:
    path = Path(location)
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise PolicyError(f"{path}: no *.yaml policy files in this folder")
        return files
    if path.is_file():
        return [path]
    raise PolicyError(f"{path}: no such policy file or folder")


def _where(error: jsonschema.ValidationError, doc: dict[str, Any]) -> str:
    where = []
    p = list(error.absolute_path)
    if len(p) >= 2 and p[0] == "routes" and isinstance(p[1], int):
        routes = doc.get("routes") or []
        name = routes[p[1]].get("name") if isinstance(routes[p[1]], dict) else None
        where.append(f"route #{p[1] + 1}" + (f" ({name!r})" if name else ""))
        p = p[2:]
    elif len(p) >= 2 and p[0] == "upstreams":
        where.append(f"upstream {p[1]!r}")
        p = p[2:]
    elif len(p) >= 2 and p[0] == "identities":
        where.append(f"identity {p[1]!r}")
        p = p[2:]
    if p:
        where.append("key " + ".".join(str(x) for x in p))
    return ", ".join(where) or "top level"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key")
    if error.validator == "oneOf" and isinstance(error.instance, str):
        return f"expected an http:// or https:// URL, got {error.instance!r}"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        # the mapping branch (index 1 of oneOf) says which key is wrong
        sub = jsonschema.exceptions.best_match(
            e for e in error.context or [] if e.relative_schema_path[0] == 1)
        key = ".".join(str(x) for x in sub.relative_path) if sub else ""
        return (f"key {key}: " if key else "") + (_describe(sub) if sub else error.message)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "pattern" and schema.get("pattern") == "^https?://":
        return f"expected an http:// or https:// URL, got {error.instance!r}"
    if error.validator == "enum":
        return f"expected one of {error.validator_value}, got {error.instance!r}"
    return error.message


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an upstream's base URL, or None."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        return "no query or fragment"
    if parts.username is not None or parts.password is not None:
        return ("no user or password in the URL (the upstream's own credential goes in "
                "with credentials: replace and replace_value_env)")
    if not parts.hostname:
        return "no host"
    try:
        parts.port  # noqa: B018 (a port that is not a number in 0-65535 raises here)
    except ValueError:
        return "the port is not a number from 0 to 65535"
    return None


def _default_scheme(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    return "AnaplanAuthToken" if host == "anaplan.com" or host.endswith(".anaplan.com") \
        else "Bearer"


def load_policy(location: str | Path) -> RoutePolicy:
    """Read, validate and compile every policy file at ``location``; raise :class:`PolicyError`."""
    files = _policy_files(location)
    upstreams: dict[str, Upstream] = {}
    identities: dict[str, Identity] = {}
    uses: list[tuple[str, Upstream]] = []  # (file, upstream) with credentials: service
    raw_routes: list[tuple[str, int, dict[str, Any]]] = []
    validator = jsonschema.Draft202012Validator(POLICY_SCHEMA)
    for file in files:
        try:
            doc = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise PolicyError(f"{file}: not valid YAML: {exc}") from None
        except OSError as exc:
            raise PolicyError(f"{file}: cannot read: {exc.strerror}") from None
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise PolicyError(f"{file}: expected a mapping with `upstreams` and `routes`")
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            err = min(errors, key=lambda e: -len(list(e.absolute_path)))
            raise PolicyError(f"{file}: {_where(err, doc)}: {_describe(err)}")
        for name, spec in (doc.get("identities") or {}).items():
            if name in identities:
                raise PolicyError(f"{file}: identity {name!r}: already defined in another file")
            for key in IDENTITY_KEYS[spec["kind"]]:
                if key not in spec:
                    raise PolicyError(f"{file}: identity {name!r}: key {key}: required when "
                                      f"kind is {spec['kind']}")
            extra = sorted(set(spec) - {"kind", "auth_url", *IDENTITY_KEYS[spec["kind"]],
                                        *IDENTITY_OPTIONAL[spec["kind"]]})
            if extra:
                raise PolicyError(f"{file}: identity {name!r}: key {extra[0]}: not used by "
                                  f"kind {spec['kind']}")
            identities[name] = Identity(name=name, **{**spec, "auth_url": spec.get(
                "auth_url", "https://auth.anaplan.com").rstrip("/")})
        for name, spec in (doc.get("upstreams") or {}).items():
            if name in upstreams:
                raise PolicyError(f"{file}: upstream {name!r}: already defined in another file")
            if isinstance(spec, str):
                spec = {"url": spec}
            url = spec["url"]
            problem = _url_problem(url)
            if problem:
                raise PolicyError(f"{file}: upstream {name!r}: key url: {problem}")
            if spec.get("credentials") == "replace" and not spec.get("replace_value_env"):
                raise PolicyError(
                    f"{file}: upstream {name!r}: key replace_value_env: required when "
                    "credentials is replace")
            service = spec.get("credentials") == "service"
            if service != ("identity" in spec):
                raise PolicyError(
                    f"{file}: upstream {name!r}: key identity: "
                    + ("required when credentials is service" if service
                       else "only used when credentials is service"))
            upstreams[name] = Upstream(
                name=name, url=url.rstrip("/"),
                credentials=spec.get("credentials", "forward"),
                scheme=spec.get("scheme", _default_scheme(url)),
                replace_header=spec.get("replace_header", "Authorization"),
                replace_value_env=spec.get("replace_value_env", ""),
                timeout=spec.get("timeout"),
                identity=spec.get("identity", ""),
            )
            if service:
                uses.append((str(file), upstreams[name]))
        for index, route in enumerate(doc.get("routes") or []):
            raw_routes.append((str(file), index, route))
    for source, used in uses:
        if used.identity not in identities:
            known = ", ".join(sorted(identities)) or "none defined"
            raise PolicyError(f"{source}: upstream {used.name!r}: key identity: unknown "
                              f"identity {used.identity!r} (known: {known})")
    routes: list[Route] = []
    seen: set[str] = set()
    for source, index, spec in raw_routes:
        label = f"{source}: route #{index + 1} ({spec['name']!r})"
        if spec["name"] in seen:
            raise PolicyError(f"{label}: key name: duplicate route name")
        seen.add(spec["name"])
        if spec["upstream"] not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none defined"
            raise PolicyError(
                f"{label}: key upstream: unknown upstream {spec['upstream']!r} (known: {known})")
        try:
            pattern = compile_path(spec["path"])
        except ValueError as exc:
            raise PolicyError(f"{label}: key path: {exc}") from None
        methods = frozenset(spec.get("methods") or HTTP_METHODS)
        routes.append(Route(
            name=spec["name"], upstream=upstreams[spec["upstream"]], methods=methods,
            path=spec["path"], scopes=tuple(spec.get("scopes") or ()), source=source,
            pattern=pattern, weight=int(spec.get("weight", 1)),
        ))
    return RoutePolicy(routes, upstreams, [str(f) for f in files], identities)


def replacement_credential(upstream: Upstream, environ: Iterable[tuple[str, str]] | None = None
                           ) -> str:
    """The value sent upstream when ``credentials: replace`` (read from an environment var)."""
    env = dict(environ) if environ is not None else os.environ
    value = env.get(upstream.replace_value_env, "")
    if not value:
        raise PolicyError(
            f"upstream {upstream.name!r}: environment variable "
            f"{upstream.replace_value_env} is empty")
    return value
