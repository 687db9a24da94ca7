"""``loralab serve``: one base and many adapters behind an OpenAI-compatible HTTP API.

``engine`` batches continuously (each row its own adapter), ``adapter_pool`` keeps the
adapters resident within ``--max-loras``, ``app`` speaks OpenAI's protocol over
Starlette, ``server`` puts it on uvicorn.
"""

from .server import BackgroundServer, ServeError, ServeOptions, build_state, serve

__all__ = ["BackgroundServer", "ServeError", "ServeOptions", "build_state", "serve"]
