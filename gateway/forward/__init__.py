"""Talking to the upstream: the forwarder (headers, bodies, timeouts) and the
HTTP/1.1 client package. Imports observe and below.
"""
