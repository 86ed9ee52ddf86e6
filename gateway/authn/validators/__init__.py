"""Token validators, one per file, selected by name (``GATEWAY_VALIDATOR``).

- ``introspection``: RFC 7662 against any authorization server
- ``jwt``: local validation of JWT access tokens against a JWKS (RFC 9068 / RFC 7519)
- ``anaplan``: Anaplan's own token-validate endpoint
"""

from gateway.authn.validators.base import (
    TokenInfo,
    TokenValidator,
    ValidatorUnavailable,
    parse_scopes,
)

__all__ = ["TokenInfo", "TokenValidator", "ValidatorUnavailable", "parse_scopes"]
