"""The Ray Serve runtime: the ingress and engine deployments (the only place Ray is imported)."""
