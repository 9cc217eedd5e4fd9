#!/bin/sh
# Started as root (plain `docker run` / `podman run`), hand /results to the unprivileged
# auditor user and drop to it: a host folder bind-mounted there is usually root-owned, and
# the demo could not create its lock file in it. Started with `--user`, run as given.
set -eu
if [ "$(id -u)" = 0 ]; then
  if [ -d /results ] && [ "$(stat -c %u /results)" != 1000 ]; then
    chown 1000:1000 /results
  fi
  exec setpriv --reuid=1000 --regid=1000 --init-groups blindspots "$@"
fi
exec blindspots "$@"
