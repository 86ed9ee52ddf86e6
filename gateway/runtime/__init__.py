"""Assembly and running: the app factory, listeners, signals, workers, the fleet's
event subscriber. Imports everything below it (the built-in server through its package only).
"""
