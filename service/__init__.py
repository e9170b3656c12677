"""HTTP service for the MARché engine (FastAPI / Ray Serve). Depends on `engine`, never the
reverse. Layers, each importing only those before it:

    settings, metrics   operator knobs and the metric definitions (leaves)
    core/               jobs, the queue, schedulers, the engine worker thread, EngineClient
    http/               the FastAPI app and its schemas
    ray_serve/          the Ray Serve deployments (the only Ray import)
"""
