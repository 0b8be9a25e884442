#!/usr/bin/env bash
# The git revision that prefect-team.yaml's deployments pin for the workers to clone: HEAD of the
# checkout `prefect deploy` runs in. Refused, with the reason, when the work tree has uncommitted
# changes (the workers would run something else than what was tested here) or when origin does not
# hold the commit (the workers could not fetch it).
set -euo pipefail
if ! git diff --quiet HEAD --; then
  echo "deploy: uncommitted changes in $(pwd): commit and push them; workers clone the revision from origin" >&2
  exit 1
fi
rev=$(git rev-parse HEAD)
git fetch -q origin
if [ -z "$(git branch -r --contains "$rev")" ]; then
  echo "deploy: $rev is not on origin ($(git remote get-url origin)): push it first" >&2
  exit 1
fi
echo "$rev"
