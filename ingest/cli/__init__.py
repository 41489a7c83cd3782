"""The command line: one module per command group over `context`; `main` is the entry point."""
