"""`s2s chaos`: the fault-injection suite (tests/test_chaos*.py, every case including the long
`chaos`-marked ones), which writes its table to docs/reliability.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from s2s.common import _fail, app, console


@app.command("chaos")
def chaos(report: Path = typer.Option(Path("docs/reliability.md"), help="where the table is written"),
          kills: int = typer.Option(3, help="SIGKILLs per training run"),
          only: Optional[str] = typer.Option(None, "-k", help="pytest -k expression: a subset of the cases"),
          seed: int = typer.Option(17, help="seed of the random kill points")) -> None:
    """Kill, starve and corrupt real processes, check the stores, and write the reliability table."""
    from core.config import find_root

    root = find_root()
    suite = sorted((root / "tests").glob("test_chaos*.py"))
    if not suite:
        _fail(f"no fault-injection suite in {root / 'tests'}: run `s2s chaos` from a checkout of the repository")
    command = [sys.executable, "-m", "pytest", *map(str, suite), "-m", "chaos or not chaos", "-q", "-p",
               "no:cacheprovider"]
    if only:
        command += ["-k", only]
    env = {**os.environ, "S2S_CHAOS_REPORT": str(report.resolve()), "S2S_CHAOS_KILLS": str(kills),
           "S2S_CHAOS_SEED": str(seed), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("S2S_ROOT", None)  # each case makes its own project root
    console.print(f"running {', '.join(str(p.relative_to(root)) for p in suite)} (all cases; the long ones take "
                  "minutes)")
    code = subprocess.run(command, cwd=root, env=env).returncode
    if code != 0:
        _fail(f"the fault-injection suite failed (pytest exit {code}); {report} has the cases that ran")
    console.print(f"reliability table written to [bold]{report}[/]")
