"""The `s2s` command line (typer): one entry point for the tasks, flows and benchmarks.

Errors a user can cause (an unknown parameter or profile, a missing sources file) end with one
clear line and exit code 2, not a traceback. The commands live in one module per group
(s2s/*_commands.py); importing them registers them on `app`. Nothing imports this package: it is
the top layer.
"""

from __future__ import annotations

from s2s import (bench_commands, chaos_commands, data_commands, model_commands,  # noqa: F401  (registers)
                 pool_commands, release_commands)
from s2s.common import app

if __name__ == "__main__":
    app()
