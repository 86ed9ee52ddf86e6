"""How a setting is described: its help text and bounds, declared once on its field.

``Settings`` (``gateway.config.settings``) declares every setting as a dataclass field made
by :func:`setting`: the field gives the name, the type and the default, and a :class:`Spec`
in its metadata gives the help text and the bounds. Everything else is derived from that
one declaration: the checks ``load_settings`` runs, the README's settings table and the
JSON schema of the Helm chart's ``config`` values (``tools/gen_settings.py`` writes both).

Each kind of bound is defined here once as a check (:meth:`Spec.problem`) and once as
JSON-schema keywords (:meth:`Spec.json_schema`), side by side, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from gateway.config.rates import RATE_PATTERN

T = TypeVar("T")

#: JSON-schema type of each Python type a setting can have
JSON_TYPES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}

# a port, 0 to 65535 (leading zeros allowed, as int() allows them)
_PORT = r"0*([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"


@dataclass(frozen=True, slots=True)
class UrlRule:
    """The URLs a setting accepts: their schemes, and how an error names them."""

    schemes: tuple[str, ...]
    named: str  # the error says "expected <named>"
    optional: bool = True  # the empty string means "not set"

    def accepts(self, value: str) -> bool:
        if not value:
            return self.optional
        return value.startswith(tuple(f"{scheme}://" for scheme in self.schemes))

    def pattern(self) -> str:
        """The same rule as a JSON-schema (ECMA-262) regular expression."""
        prefix = "(" + "|".join(re.escape(s) for s in self.schemes) + ")://"
        return f"^({prefix}|$)" if self.optional else f"^{prefix}"


#: an authorization server's or provider's endpoint; empty: not used
HTTP_URL = UrlRule(("https", "http"), "an https:// URL")
#: every form of Redis URL the state layer connects to (the error names the main ones)
REDIS_URL = UrlRule(
    ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster",
     "rediss+cluster"),
    "a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL",
    optional=False)


@dataclass(frozen=True, slots=True)
class Spec:
    """A setting's help text and the bounds of its value, beyond its type."""

    doc: str
    choices: tuple[str, ...] = ()
    any_case: bool = False  # choices compared after upper-casing the value
    minimum: float | None = None
    above: float | None = None  # an exclusive minimum
    zero: str = ""  # what 0 means, when it means something special ("no limit")
    url: UrlRule | None = None
    hostport: bool = False
    rate: bool = False  # a rate limit, N/PERIOD (gateway.config.rates); empty: none

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused (the caller names the setting first), or None."""
        if self.choices:
            compared = str(value).upper() if self.any_case else value
            if compared not in self.choices:
                return f"expected {_either(self.choices)}, got {value!r}"
        if self.url is not None and not self.url.accepts(value):
            return f"expected {self.url.named}"  # not the value: a URL may hold a password
        if self.hostport and split_hostport(value) is None:
            return f"expected host:port, got {value!r}"
        if self.rate and value and re.fullmatch(RATE_PATTERN, value) is None:
            return f"expected N/PERIOD such as 600/60s (PERIOD in s, m or h), got {value!r}"
        if self.above is not None and not value > self.above:
            return f"must be greater than {self.above:g}"
        if self.minimum is not None and value < self.minimum:
            meaning = f" ({self.zero})" if self.zero else ""
            return f"must be {self.minimum:g}{meaning} or more"
        return None

    def json_schema(self, kind: type, default: Any, variable: str) -> dict[str, Any]:
        """The JSON schema of one value, with the same bounds as :meth:`problem`."""
        out: dict[str, Any] = {
            "type": JSON_TYPES[kind],
            "description": f"{self.doc.replace('`', '')} ({variable})",
            "default": default,
        }
        if self.choices:
            lower = [c.lower() for c in self.choices] if self.any_case else []
            out["enum"] = [*self.choices, *lower]
        if self.url is not None:
            out["pattern"] = self.url.pattern()
        if self.hostport:
            out["pattern"] = f"^.*:{_PORT}$"
        if self.rate:
            out["pattern"] = f"^$|{RATE_PATTERN}"
        if self.above is not None:
            out["exclusiveMinimum"] = self.above
        if self.minimum is not None:
            out["minimum"] = self.minimum
        return out


def setting(default: T, doc: str, *, choices: tuple[str, ...] = (), any_case: bool = False,
            minimum: float | None = None, above: float | None = None, zero: str = "",
            url: UrlRule | None = None, hostport: bool = False, rate: bool = False) -> T:
    """A ``Settings`` field: its default, help text and bounds (see :class:`Spec`)."""
    spec = Spec(doc, choices=choices, any_case=any_case, minimum=minimum, above=above,
                zero=zero, url=url, hostport=hostport, rate=rate)
    declared: T = dataclasses.field(default=default, metadata={"spec": spec})
    return declared


class Described(NamedTuple):
    """One setting as declared: field name, Python type, default and :class:`Spec`."""

    name: str
    kind: type
    default: Any
    spec: Spec


@functools.cache
def describe(cls: type) -> tuple[Described, ...]:
    """Every field of the settings dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if not isinstance(spec, Spec):
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting(...)")
        if hints[f.name] not in JSON_TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: a setting is a str, int, float or bool")
        out.append(Described(f.name, hints[f.name], f.default, spec))
    return tuple(out)


def split_hostport(value: str) -> tuple[str, int] | None:
    """``host:port`` (IPv6 as ``[::1]:8080``) split, or None when it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (the documented default)


def _either(choices: tuple[str, ...]) -> str:
    """``("a", "b", "c")`` -> ``a, b or c``."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
