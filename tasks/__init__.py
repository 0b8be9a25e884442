"""The work of the pipeline, by phase (data/, training/, evaluation/, release/, benchmarks/):
plain functions, each wrapped as a Prefect task by flows/ and each reachable from the `s2s`
command line."""

import os

# Quiet the libraries that phone home by default; a user can still turn them back on.
for _name, _value in {
    "PYANNOTE_METRICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_name, _value)
