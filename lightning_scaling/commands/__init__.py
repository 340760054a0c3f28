"""Subcommands of the ``lightning-scaling`` CLI, one module each."""
