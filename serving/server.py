"""`s2s serve`: load the model (registry alias or folder), then run the app under uvicorn.

Shutdown is graceful: the first SIGTERM/SIGINT stops new sessions, lets the replies in flight
finish (serving.shutdown_grace_s), closes the remaining sockets with 1001 and only then lets
uvicorn exit; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import uvicorn

from core.config import Params
from core.tracking import tracking_uri
from serving.app import create_app
from serving.bundle import ModelBundle, load_bundle


def load_model(params: Params, model: str | None = None) -> tuple[ModelBundle, str]:
    """The bundle to serve and where it came from; BundleError (with the reason) when there is none."""
    uri = model or params.serving.model
    tracking = tracking_uri(params.root, params.mlflow.tracking_uri)
    bundle = load_bundle(uri, tracking_uri=tracking)
    version = registered_version(uri, tracking)
    if version:
        bundle.meta["registered_version"] = version  # /metrics' s2s_model_info names it
    return bundle, uri


def registered_version(uri: str, tracking: str) -> str | None:
    """The version number behind `models:/name@alias` or `models:/name/N`; None for a folder."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", str(uri))
    if not match:
        return None
    if match.group(2):
        return match.group(2)
    from mlflow import MlflowClient

    try:
        return str(MlflowClient(tracking_uri=tracking, registry_uri=tracking)
                   .get_model_version_by_alias(match.group(1), match.group(3)).version)
    except Exception:  # the bundle loaded, so this is a race with an alias change: leave it out
        return None


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.s2s_app = app
        self.draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.draining = True
        state = self.s2s_app.state.s2s
        loop = asyncio.get_event_loop()

        async def drain_then_exit() -> None:
            await state.drain(state.config.shutdown_grace_s)
            super(DrainingServer, self).handle_exit(sig, frame)

        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(drain_then_exit()))


def serve(params: Params, model: str | None = None, host: str | None = None, port: int | None = None) -> None:
    bundle, uri = load_model(params, model)
    app = create_app(bundle, params.serving, uri)
    config = uvicorn.Config(app, host=host or params.serving.host, port=port or params.serving.port,
                            ws_max_size=max(params.serving.max_message_bytes * 2, 1 << 16), log_level="info",
                            timeout_graceful_shutdown=int(params.serving.shutdown_grace_s) + 5)
    DrainingServer(config, app).run()
