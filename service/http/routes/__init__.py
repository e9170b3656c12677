"""The app's routers, one per resource: `generate` (`/generate` and its stream), `system` (the
model's classes and facts, health, readiness, metrics), `openai` (`/v1`, OpenAI's Images API)
and `web` (the page at `/`). `build_app` includes them; their routes take what they need as
typed dependencies (`service.http.deps`)."""
