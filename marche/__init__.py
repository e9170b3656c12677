"""The `marche` command line: composes the engine (and, for `serve`, the service)."""
