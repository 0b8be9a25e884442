"""The base every other package stands on: configuration, labels, atomic files, hashes,
checkpoint files and where the MLflow store is. It imports no other package of the project, so
models/, serving/, tasks/, flows/ and the CLI can all use it without a circle."""
