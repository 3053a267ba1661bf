"""What ships: the local pod replica end to end, and static checks of the image, compose file and manifests."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from infantry.cli import _flags, main
from infantry.settings import Settings, load_settings
from tests.support import require_binary, wait_until

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "examples" / "kubernetes").rglob("*.yaml"))
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def load_local_pod() -> Any:
    spec = importlib.util.spec_from_file_location("local_pod", ROOT / "examples" / "local" / "pod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_pod_serves_the_new_value_after_a_reload(tmp_path: Path) -> None:
    for name, package in (("etcd", "etcd-server"), ("etcdctl", "etcd-client"), ("nginx", "nginx-light")):
        require_binary(name, package)
    pod = load_local_pod().LocalPod(tmp_path)
    try:
        pod.start("blue")
        assert pod.page() == "color: blue\n"
        master, workers = pod.nginx_pids()
        assert workers
        pod.put("green")
        wait_until("nginx to serve the new value", lambda: pod.page() == "color: green\n", timeout=15)
        wait_until("the old workers to be replaced", lambda: not (pod.nginx_pids()[1] & workers), timeout=20)
        master_after, workers_after = pod.nginx_pids()
        assert master_after == master  # reloaded, not restarted
        assert workers_after and not workers_after & workers
    finally:
        pod.stop()


def test_local_pod_script_runs_by_hand() -> None:
    result = subprocess.run([str(ROOT / "examples" / "local" / "run.sh")], capture_output=True, text=True,
                            timeout=120, env={"PYTHON": sys.executable, "PATH": "/usr/sbin:/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "nginx serves: color: blue" in result.stdout
    assert "nginx serves: color: green" in result.stdout and "reloaded" in result.stdout


# -- manifests -------------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version_", ["1.29.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(ROOT)) for p in MANIFESTS])
def test_manifests_validate_strictly(path: Path, version_: str) -> None:
    for doc in documents(path):
        if doc["apiVersion"].startswith("cert-manager.io/"):
            # kubernetes-validate has no schemas for CRDs (its CLI passes them with a warning): check by hand.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, version_, strict=True)
            check_cert_manager(doc)
            continue
        kubernetes_validate.validate(doc, version_, strict=True)


def check_cert_manager(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "cert-manager.io/v1"
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    if doc["kind"] == "Issuer":
        assert set(doc["spec"]) == {"selfSigned"}
    else:
        assert doc["kind"] == "Certificate"
        assert set(doc["spec"]) <= {"secretName", "duration", "renewBefore", "dnsNames", "issuerRef"}
        assert doc["spec"]["issuerRef"]["kind"] == "Issuer"


def test_the_webhook_configuration_is_safe_to_run() -> None:
    webhook_dir = ROOT / "examples" / "kubernetes" / "webhook"
    config = documents(webhook_dir / "mutatingwebhook.yaml")[0]
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "infantry-system/infantry-webhook"
    (hook,) = config["webhooks"]
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["timeoutSeconds"] == 5 and hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail"
    assert hook["objectSelector"]["matchLabels"] == {"infantry.dev/inject": "true"}
    excluded = hook["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn" and set(excluded["values"]) == {"kube-system", "infantry-system"}
    assert hook["clientConfig"]["service"]["path"] == "/mutate"
    objects = {(d["kind"], d["metadata"]["name"]): d for d in documents(webhook_dir / "webhook.yaml")}
    assert objects[("Deployment", "infantry-webhook")]["spec"]["replicas"] == 2
    assert ("Service", "infantry-webhook") in objects and ("PodDisruptionBudget", "infantry-webhook") in objects
    certificate = next(d for d in documents(webhook_dir / "certificate.yaml") if d["kind"] == "Certificate")
    assert "infantry-webhook.infantry-system.svc" in certificate["spec"]["dnsNames"]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in documents(path):
            spec = doc.get("spec", {})
            if doc["kind"] == "Pod":
                yield f"{path.name}/{doc['metadata']['name']}", spec
            elif "template" in spec:
                yield f"{path.name}/{doc['metadata']['name']}", spec["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    specs = list(pod_specs())
    assert len(specs) >= 3
    for name, pod in specs:
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, name
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for container in containers(pod):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert {"requests", "limits"} <= set(container["resources"]), (name, container["name"])


def test_classic_native_and_job_have_their_shapes() -> None:
    classic = next(
        d for d in documents(ROOT / "examples/kubernetes/classic/deployment.yaml") if d["kind"] == "Deployment"
    )
    pod = classic["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    assert [c["name"] for c in pod["initContainers"]] == ["infantry-install"]
    watch = pod["containers"][-1]
    assert watch["name"] == "infantry-watch"  # last, so kubectl logs defaults to the app
    assert watch["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Readiness says a set is live, not /readyz: a change being published or refused must not take the
    # pod out of its Service.
    assert watch["readinessProbe"]["httpGet"]["path"] == "/configured"
    app_uid = pod["securityContext"]["runAsUser"]
    assert all(c.get("securityContext", {}).get("runAsUser", app_uid) == app_uid for c in containers(pod))

    native = next(
        d for d in documents(ROOT / "examples/kubernetes/native/deployment.yaml") if d["kind"] == "Deployment"
    )
    init = native["spec"]["template"]["spec"]["initContainers"]
    assert len(init) == 1 and init[0]["restartPolicy"] == "Always"
    assert "/configs/..data" in " ".join(init[0]["startupProbe"]["exec"]["command"])

    job = documents(ROOT / "examples/kubernetes/job/job.yaml")[0]
    job_pod = job["spec"]["template"]["spec"]
    assert [c["args"][0] for c in job_pod["initContainers"]] == ["install"]
    assert not any("watch" in c.get("args", []) for c in containers(job_pod))


def infantry_containers() -> Iterator[tuple[str, str, list[str], dict[str, str]]]:
    """(where, command, arguments, INFANTRY_* environment) of every infantry container in the examples."""
    for name, pod in pod_specs():
        for container in containers(pod):
            if container["image"].startswith("infantry"):
                args = list(container.get("args", []))
                env = {e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("INFANTRY_")}
                yield f"{name}/{container['name']}", args[0], args[1:], env
    for service_name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        if service.get("image", "").startswith("infantry"):
            command = list(service["command"])
            yield f"compose/{service_name}", command[0], command[1:], dict(service.get("environment", {}))


def test_examples_pass_only_settings_infantry_accepts() -> None:
    seen = list(infantry_containers())
    assert len(seen) >= 6
    for where, command_name, args, env in seen:
        for variable in env:
            assert variable.removeprefix("INFANTRY_").lower() in Settings.model_fields, (where, variable)
        command = main.commands[command_name]
        assert isinstance(command, click.Command)
        with command.make_context(command_name, list(args)) as ctx:
            flags = _flags(ctx.params)
        load_settings(flags, env)  # raises SettingsError, naming the setting, on anything it rejects


# -- compose and the image -------------------------------------------------------------------------


def test_compose_file_has_the_five_services_wired_as_documented() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"etcd", "seed", "infantry-install", "app", "infantry-watch"}
    assert services["infantry-watch"]["pid"] == "service:app"
    assert services["app"]["depends_on"]["infantry-install"]["condition"] == "service_completed_successfully"
    assert services["infantry-install"]["depends_on"]["seed"]["condition"] == "service_completed_successfully"
    for name in ("etcd", "app", "infantry-watch"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["infantry-watch"]["user"] == services["infantry-install"]["user"]
    build = services["infantry-install"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    # Both infantry services build the image, so that Compose never tries to pull it.
    assert services["infantry-watch"]["build"] == build
    assert services["infantry-watch"]["image"] == services["infantry-install"]["image"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
            else:
                assert source in compose["volumes"], source


def test_every_example_names_the_image_the_readme_builds() -> None:
    built = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", (ROOT / "README.md").read_text())
    assert built, "the README shows no docker build"
    tag = built.group(1)
    assert tag == f"infantry:{version('infantry')}"
    named = [service["image"] for service in yaml.safe_load(COMPOSE.read_text())["services"].values()]
    for manifest in sorted((ROOT / "examples" / "kubernetes").rglob("*.yaml")):
        named += re.findall(r"image:\s*(\S+)", manifest.read_text())
    named += re.findall(r"`(infantry:[^`]+)`", (ROOT / "README.md").read_text())
    infantry_images = {name for name in named if name.startswith("infantry:") or name.startswith("infantry@")}
    assert infantry_images == {tag}


def dockerfile_stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for raw in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_and_needs_no_shell() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert "USER 65532:65532" in final
    assert 'ENTRYPOINT ["infantry"]' in final
    assert not any(line.upper().startswith("RUN ") for line in final)  # nothing built, no shell needed
    assert any("org.opencontainers.image.title" in line for line in final)
    for line in stages[0]:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_wheel_has_the_console_script_and_py_typed(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next(tmp_path.glob("infantry-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "infantry/py.typed" in names
    assert "infantry/sources/etcd.py" in names
    assert re.search(r"^infantry = infantry\.cli:main$", entry_points, re.M)


def test_version_is_the_package_version() -> None:
    result = subprocess.run([sys.executable, "-m", "infantry", "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"infantry, version {version('infantry')}"
