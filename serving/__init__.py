"""The FastAPI WebSocket app that serves the registered model: sessions, protocol, batching and
the demo page. Filled by the serving issue; nothing here yet, by design of the layout."""
