"""The OpenAI-compatible HTTP server over `AsyncLLM` (`nucleus serve`).

`build_app` (nucleus.server.app) makes the FastAPI app; `run_server` and `add_serve_arguments`
(nucleus.server.serve) run it under uvicorn with graceful shutdown.
"""

from nucleus.server.app import build_app

__all__ = ["build_app"]
