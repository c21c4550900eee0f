"""deploy/compose.yaml, deploy/kubernetes/, the Dockerfile and the README's ``docker run`` lines: every lpm-node
command line, flag, settings file and environment variable they use exists, the roles are the ones the README
describes, and the console is published on the host's loopback only."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path

import yaml

from lpm_node.cli.main import build_parser
from lpm_node.core.config import load_settings
from lpm_node.node.engine import uses_job_engine

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _check_command(argv: list[str], mounted_config: dict[str, Path], env: dict[str, str]) -> str:
    """The command line parses; its config file is a file of the repository that loads; returns its role."""
    for name in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert name in env, f"{name} is used in {argv} but not set in the container's env"
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv]
    assert argv[0] == "lpm-node", argv
    args = build_parser().parse_args(argv[1:])
    config = mounted_config[args.config]
    overrides = {"node": {k: v for k, v in (("role", getattr(args, "role", None)),
                                            ("database_url", getattr(args, "database_url", None))) if v}}
    settings = load_settings(config, overrides)
    if args.command == "serve":
        assert uses_job_engine(settings.db_url), "several processes share a PostgreSQL database"
        assert settings.node.data_dir == "/data"
        return settings.node.role
    return args.command


def test_compose_runs_postgres_two_receivers_two_gpu_workers_one_sender_on_one_volume():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    roles: Counter[str] = Counter()
    for name, service in compose["services"].items():
        if name == "postgres":
            assert service["image"].startswith("postgres:")
            continue
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert mounts["/data"] == "lpm-data", name  # the one shared data volume
        configs = {target: DEPLOY / source for target, source in mounts.items() if source.startswith("./")}
        configs = {target: path for target, path in configs.items() if path.is_file()}
        role = _check_command(service["command"], configs, service.get("environment", {}))
        roles[role] += service.get("deploy", {}).get("replicas", 1)
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] == "CMD"
            assert _check_command(service["healthcheck"]["test"][1:], configs, {}) == "doctor"
        if role == "worker":
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"] and "/models" in mounts
    assert roles == {"receiver": 2, "worker": 2, "sender": 1}
    assert set(compose["volumes"]) == {"lpm-data", "pg-data"}


def test_kubernetes_manifests_use_existing_commands_settings_and_variables():
    documents = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "lpm-node.yaml").read_text()) if d]
    kinds = Counter(d["kind"] for d in documents)
    assert kinds["Deployment"] == 3 and kinds["Service"] == 1
    claims = {d["metadata"]["name"] for d in documents if d["kind"] == "PersistentVolumeClaim"}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in documents if d["kind"] == "Secret"}
    roles: Counter[str] = Counter()
    for deployment in (d for d in documents if d["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:  # made from deploy/lpm-node.toml (the manifest's first lines say how)
                assert volume["configMap"]["name"] == "lpm-node-config"
        (container,) = spec["containers"]
        env = {}
        for item in container.get("env", []):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "lpm-node-data"
        configs = {f"{path}/lpm-node.toml": DEPLOY / "lpm-node.toml" for path, name in mounts.items()
                   if "configMap" in volumes[name]}
        role = _check_command(container["args"], configs, env)
        roles[role] += deployment["spec"]["replicas"]
        assert deployment["spec"]["selector"]["matchLabels"]["role"] == role
        if "livenessProbe" in container:
            assert _check_command(container["livenessProbe"]["exec"]["command"], configs, env) == "doctor"
        if role == "worker":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert roles == {"receiver": 2, "worker": 2, "sender": 1}
    service = next(d for d in documents if d["kind"] == "Service")
    assert service["spec"]["selector"]["role"] == "receiver"
    assert service["spec"]["ports"][0]["targetPort"] == load_settings(DEPLOY / "lpm-node.toml").node.port


def _dockerfile() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments left out): keyword -> arguments."""
    instructions: dict[str, list[str]] = {}
    joined = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.setdefault(keyword, []).append(rest.strip())
    return instructions


def _docker_runs() -> list[list[str]]:
    """The ``docker run`` command lines of the README's "Docker" section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line) for line in section.splitlines() if line.startswith("docker run ")]


def test_dockerfile_runs_existing_commands_installs_nnunet_v1_and_exposes_dicom_and_console():
    instructions = _dockerfile()
    [base] = instructions["FROM"]
    assert re.fullmatch(r"nvidia/cuda:[\w.\-]+-runtime-[\w.]+", base), base
    assert instructions["USER"] == ["lpm"] and instructions["VOLUME"] == ['["/data", "/models"]']
    for copied in instructions["COPY"]:
        for name in copied.split()[:-1]:
            assert (REPO / name).exists(), name
    image_config = {"/opt/lpm-node/config/docker.toml": REPO / "config" / "docker.toml"}
    [cmd] = instructions["CMD"]
    [health] = instructions["HEALTHCHECK"]
    serve, check = json.loads(cmd), json.loads(health.split(" CMD ", 1)[1])
    assert serve[:2] == ["lpm-node", "serve"]
    # the health check calls the node's own listener with the node's own settings
    assert check == ["lpm-node", "doctor", "--liveness", "--config", serve[serve.index("--config") + 1]]
    parser = build_parser()
    for argv in (serve, check):
        args = parser.parse_args(argv[1:])
        load_settings(image_config[args.config])
    settings = load_settings(REPO / "config" / "docker.toml")
    assert settings.node.data_dir == "/data" and settings.model.folder == "/models"
    exposed = {int(port) for line in instructions["EXPOSE"] for port in line.split()}
    assert exposed == {settings.node.port, settings.console.port}
    assert settings.console.host == "127.0.0.1"  # the console is off unless asked, and then needs users off loopback
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "nnunet-v1" in extras and any('pip install ".[nnunet-v1]"' in line for line in instructions["RUN"])


def _image_index(run: list[str]) -> int:
    """Where the image name is in a ``docker run`` line (the command line follows it)."""
    return next(i for i, token in enumerate(run) if token == "lpm-node" and run[i - 1] != "--name")


def test_readme_docker_runs_parse_and_publish_the_console_on_loopback_only():
    runs = _docker_runs()
    assert len(runs) == 2
    parser = build_parser()
    for run in runs:
        image = _image_index(run)
        args = parser.parse_args(run[image + 1:])
        published = [run[i + 1] for i, token in enumerate(run[:image]) if token == "-p"]
        mounts = dict(reversed(run[i + 1].split(":")[:2]) for i, token in enumerate(run[:image]) if token == "-v")
        assert "11112:11112" in published and mounts["/data"] and "--gpus" in run[:image]
        assert any(token.endswith(":/models:ro") for token in run[:image]), "the models are mounted read-only"
        if args.config.startswith("/opt/lpm-node/config/"):
            load_settings(REPO / "config" / Path(args.config).name)
        else:
            assert args.config in mounts, "the settings file is mounted into the container"
        if getattr(args, "console", False):
            assert args.console_host == "0.0.0.0"  # reachable through the port mapping; users then required
            assert "127.0.0.1:8480:8480" in published
            assert not [p for p in published if p.endswith(":8480") and not p.startswith("127.0.0.1:")]
    assert any(getattr(parser.parse_args(r[_image_index(r) + 1:]), "console", False) for r in runs)
