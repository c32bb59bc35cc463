"""Subcommands of the ``nnpc`` console script, one module each."""
