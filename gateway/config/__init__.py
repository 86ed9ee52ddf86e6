"""What the operator configures: settings (one description each) and policy files.
Imports nothing of the gateway.
"""
