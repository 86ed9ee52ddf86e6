"""The built-in self-service OAuth authorization server (enabled by ``GATEWAY_ISSUER``).

One module per RFC, as a reader would look for a rule:

- ``rfc6749``  token endpoint, client authentication, refresh tokens (section 6)
- ``rfc7636``  PKCE (S256 only, required for every client)
- ``rfc8628``  device authorization grant
- ``rfc7662``  introspection endpoint
- ``rfc7009``  revocation endpoint
- ``rfc8414``  authorization server metadata
- ``rfc9068``  JWT access tokens and the signing keys (JWKS)
- ``authorize`` the authorization endpoint (RFC 6749 section 4.1, RFC 9207 ``iss``)
- ``pages``    login, consent and device pages (HTML, CSRF, framing refused)
- ``sso``      login through the company's OpenID Connect provider

Shared parts: ``models`` (clients, grants, token policy), ``storage`` (Redis),
``hashing`` (slow hashes, token generation), ``errors`` (RFC 6749 error bodies),
``issuance`` (issuing, rotating and revoking tokens), ``validator`` (the gateway's
in-process validator for these tokens).
"""
