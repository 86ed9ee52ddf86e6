"""The request's way through the gateway, stage by stage: path hygiene, route match,
token, validation, client governance, scopes, forwarding. Imports authn, forward and below.
"""
