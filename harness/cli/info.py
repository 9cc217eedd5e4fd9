"""``blindspots kernels | list``: what this CPU computes and what is registered."""

from __future__ import annotations

import argparse
import json
import sys

from defenses.base import DEFENSES
from exporters.catalog import PRECISIONS
from harness.attacks.base import ATTACKS
from harness.data.base import DATASETS
from harness.training.catalog import MODELS


def cmd_kernels(args: argparse.Namespace) -> int:
    """What this CPU's INT8 kernels compute, measured (see harness.runtime.kernels)."""
    from harness.runtime.kernels import probe_host

    host = probe_host()
    print(json.dumps(host.as_dict(), indent=2))
    if host.profiles_differ:
        print(
            "this CPU's default INT8 kernels saturate int16 pair sums: 'host' and 'exact' "
            "profiles give different numbers; results use 'exact' unless --int8-kernels host",
            file=sys.stderr,
        )
    else:
        print("this CPU's INT8 kernels are int32-exact: both profiles coincide", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for registry in (DATASETS, ATTACKS, MODELS, PRECISIONS, DEFENSES):
        print(f"{registry.kind}s: {', '.join(registry.names())}")
    return 0
