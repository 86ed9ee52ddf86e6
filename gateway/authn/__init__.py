"""Is the token good? The token cache (in-process, Redis, single-flight) and the
validators, one per file. Imports observe and below.
"""
