"""The HTTP front: the FastAPI app and its request/response contract. Reaches the engine only
through an `EngineClient` (`service.core.client`)."""
