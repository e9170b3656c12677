"""The batching core: jobs, their queue, the schedulers and the engine worker thread.

Imports the engine and `service.metrics` / `service.settings`; never FastAPI or Ray."""
