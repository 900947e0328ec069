"""Operator tools behind the CLI: one function per command and what they use."""
