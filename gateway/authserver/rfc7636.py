"""Proof Key for Code Exchange (RFC 7636), required for every client, S256 only.

- Section 4.1: the ``code_verifier`` is 43 to 128 characters of
  ``[A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~"``.
- Section 4.2: ``code_challenge = BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))``;
  with S256 that is always 43 characters of the base64url alphabet, no padding.
- Section 4.3: ``code_challenge_method`` defaults to ``plain`` when absent. ``plain``
  offers no protection once the authorization request is seen (section 7.2), so this
  server refuses it, and so refuses a challenge sent without a method.
- Section 4.4.1: a missing challenge, or a method the server does not support, is an
  ``invalid_request`` error at the authorization endpoint.
- Section 4.6: the server recomputes the challenge from the verifier and compares; a
  mismatch is ``invalid_grant`` at the token endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from gateway.authserver.errors import InvalidGrant, InvalidRequest

S256 = "S256"
SUPPORTED_METHODS = (S256,)

_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43}")


def s256(verifier: str) -> str:
    """Section 4.2: ``BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))`` without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_challenge(challenge: str | None, method: str | None) -> str:
    """Validate the authorization request's PKCE parameters; returns the challenge.

    Raises :class:`InvalidRequest` (section 4.4.1) when the challenge is missing,
    malformed, or its method is anything but S256 (``plain`` included)."""
    if not challenge:
        raise InvalidRequest("code_challenge is required (PKCE, RFC 7636); "
                             "send code_challenge_method=S256 with it.")
    if method != S256:
        shown = "absent (which means plain)" if not method else repr(method[:20])
        raise InvalidRequest(f"code_challenge_method {shown} is not supported: use S256.")
    if not _S256_CHALLENGE.fullmatch(challenge):
        raise InvalidRequest("code_challenge is not a BASE64URL-encoded SHA-256 digest.")
    return challenge


def check_verifier(verifier: str | None) -> str:
    """Section 4.1 syntax of the token request's ``code_verifier``."""
    if not verifier:
        raise InvalidRequest("code_verifier is required (PKCE, RFC 7636).")
    if not _VERIFIER.fullmatch(verifier):
        raise InvalidRequest("code_verifier must be 43 to 128 characters of "
                             "A-Z a-z 0-9 - . _ ~ (RFC 7636 section 4.1).")
    return verifier


def verify(verifier: str, challenge: str) -> None:
    """Section 4.6: raises :class:`InvalidGrant` unless ``S256(verifier) == challenge``.

    The comparison takes the same time wherever the strings differ."""
    if not hmac.compare_digest(s256(check_verifier(verifier)).encode("ascii"),
                               challenge.encode("ascii", "replace")):
        raise InvalidGrant("code_verifier does not match the code_challenge (RFC 7636 4.6).")
