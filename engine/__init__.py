"""MARché Serve engine: exact MAR sampling (and MARché decoding) in plain PyTorch.

Importable without ray, fastapi or prometheus; the service depends on this package, never
the reverse.
"""

__version__ = "0.1.0"
