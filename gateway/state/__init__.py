"""Redis: the connection, the one owner of the key layout (``keys``), events and audit
entries, the embedded server. Imports config and protocol only.
"""
