"""Serving the model: the bundle format and where a bundle is read from (a folder or the MLflow
registry), the one-conversation session, the batched engine the server runs, the FastAPI
WebSocket app, the energy VAD and the demo page. It stands on models/ and core/ only, so the
registered pyfunc ships without tasks/."""
