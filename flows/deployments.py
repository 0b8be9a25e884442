"""Register the deployments of prefect.yaml on a running Prefect server, for `make ui`
(scripts/ui.sh): the process work pool (created when missing), `prefect deploy --all` from the
project root, then a check that every deployment is there and the schedules prefect.yaml turns on
are on, and the lines that tell the operator how to start a run. Idempotent: a second `make ui`
updates the same deployments.

    python -m flows.deployments --root PROJECT_ROOT     (PREFECT_API_URL must point at the server)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

POOL = "s2s-process"


def ensure_pool(name: str = POOL) -> bool:
    """Create the process work pool unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def deploy(root: Path) -> None:
    """`prefect deploy --all` in the project root (its build step records the root for the worker)."""
    prefect = str(Path(sys.executable).with_name("prefect"))
    result = subprocess.run([prefect, "deploy", "--all", "--no-prompt"], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed in {root} (rc={result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-4000:]}")


def registered(root: Path) -> list[dict[str, Any]]:
    """Each deployment of prefect.yaml as the server has it: name, id, schedules and whether on.
    Raises when one is missing or a schedule prefect.yaml turns on is off."""
    from prefect.client.orchestration import get_client

    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        flows = {d.flow_id: client.read_flow(d.flow_id).name for d in deployments.values()}
    found = []
    for entry in spec["deployments"]:
        deployment = deployments.get(entry["name"])
        if deployment is None:
            raise RuntimeError(f"deployment {entry['name']!r} of prefect.yaml is not on the server after deploy")
        wanted = [s for s in entry.get("schedules") or [] if s.get("active", True)]
        active = [s for s in deployment.schedules if s.active]
        if len(active) < len(wanted) or (wanted and deployment.paused):
            raise RuntimeError(f"deployment {entry['name']!r}: prefect.yaml turns {len(wanted)} schedule(s) on, "
                               f"the server has {len(active)} on (paused: {deployment.paused})")
        found.append({"name": f"{flows[deployment.flow_id]}/{deployment.name}", "id": str(deployment.id),
                      "schedules": [s.schedule.cron for s in active if getattr(s.schedule, "cron", None)]})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the project root (prefect.yaml, flows/)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        created = ensure_pool()
        deploy(root)
        found = registered(root)
    except RuntimeError as exc:
        print(f"make ui: {exc}", file=sys.stderr)
        return 1
    print(f"Work pool {POOL}: {'created' if created else 'already there'}; deployments registered from {root}:")
    for d in found:
        schedule = f"schedule on ({', '.join(d['schedules'])} UTC)" if d["schedules"] else "no schedule"
        print(f"  {d['name']:<20} {schedule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
