"""What operators see: Prometheus metrics, the access log, usage counting.
Imports state, config and protocol.
"""
