"""From a gated candidate to a release: the bundle candidate, the MLflow registry and its aliases,
the sign-off, the flow-run records and publishing to the Hugging Face Hub."""
