"""vramlab's experiment side: CLI, and (in later work) tracing and GPU measurement.

Importing this package must stay cheap: torch and transformers are imported only
inside the commands that need them, so `vramlab predict` answers without them.
"""
