"""oauth-gateway: an OAuth token gateway in front of the Anaplan REST APIs.

The request pipeline, in order (see ``gateway.pipeline``):

1. ``gateway.paths``       refuse dangerous paths before anything else
2. ``gateway.policy``      match a route (first match in file order wins)
3. ``gateway.tokens``      extract the bearer token (``Bearer`` / ``AnaplanAuthToken``)
4. ``gateway.validators``  validate it (RFC 7662, Anaplan token-validate, local JWT)
   through ``gateway.cache`` (in-process layer, then Redis, single-flight)
5. ``gateway.clients``     client governance: disable flags and allowed scopes
6. ``gateway.proxy``       mutate and forward, streaming
7. ``gateway.metrics`` / ``gateway.accesslog`` / ``gateway.usage``  observe
"""

__version__ = "0.1.0"
