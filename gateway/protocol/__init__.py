"""The vocabulary every layer speaks: RFC-shaped errors, presented tokens and their
keyed digests, OAuth client authentication. Imports nothing of the gateway.
"""
