"""The authorization server's metrics, registered in the gateway app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class AuthServerMetrics:
    """Tokens issued, refresh reuse detected, device-flow outcomes, logins."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens_issued = Counter(
            "gateway_as_tokens_issued", "Access tokens issued by the built-in server.",
            ["client_id", "grant_type"], registry=registry)
        self.refresh_reuse = Counter(
            "gateway_as_refresh_reuse_detected",
            "Spent refresh tokens presented again (the grant was revoked).",
            ["client_id"], registry=registry)
        self.device_flow = Counter(
            "gateway_as_device_flow", "Device-flow outcomes.", ["outcome"], registry=registry)
        self.logins = Counter(
            "gateway_as_logins", "Interactive logins by method and outcome.",
            ["method", "outcome"], registry=registry)
        self.login_throttled = Counter(
            "gateway_as_login_throttled",
            "Sign-in attempts refused unchecked while throttled, by reason (user_source: "
            "one user from one source; source: one address; user: one user from browsers "
            "it never signed in from).", ["reason"], registry=registry)
        self.grants_revoked = Counter(
            "gateway_as_grants_revoked", "Grants revoked, by reason.", ["reason"],
            registry=registry)
