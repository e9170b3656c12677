"""HTTP service for the MARché engine (FastAPI / Ray Serve). Depends on `engine`, never the
reverse."""
