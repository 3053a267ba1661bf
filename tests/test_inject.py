"""`infantry inject`: golden outputs for every kind in both modes, idempotency, and annotation handling."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infantry import options
from infantry.errors import InvalidAnnotation
from infantry.inject import STATUS, InjectOptions, inject_pod, parse_options
from infantry.settings import load_settings
from tests.support import infantry

GOLDEN = Path(__file__).parent / "golden" / "inject"
INPUTS = sorted(p for p in GOLDEN.glob("*.yaml") if p.stem.count(".") == 0)
UPDATE = os.environ.get("INFANTRY_UPDATE_GOLDEN") == "1"
SOURCE = "etcd://etcd.config.svc:2379/app/"
MODE_FLAGS = {
    "classic": ["--classic", "--process", "nginx"],
    "native": ["--native", "--reload-url", "http://127.0.0.1:8080/-/reload"],
}


def validate_strictly(text: str) -> None:
    for doc in yaml.safe_load_all(text):
        for item in doc["items"] if doc.get("kind") == "List" else [doc]:
            for version in ("1.29.0", kubernetes_validate.latest_version()):
                kubernetes_validate.validate(item, version, strict=True)


def run_inject(path: Path, *flags: str) -> str:
    result = infantry("inject", "-f", str(path), *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("mode", ["classic", "native"])
@pytest.mark.parametrize("source", INPUTS, ids=[p.stem for p in INPUTS])
def test_golden_output_validates_and_is_stable(source: Path, mode: str, tmp_path: Path) -> None:
    out = run_inject(source, "--source", SOURCE, *MODE_FLAGS[mode])
    golden = GOLDEN / f"{source.stem}.{mode}.yaml"
    if UPDATE:
        golden.write_text(out)
    assert out == golden.read_text(), f"output differs from {golden.name} (INFANTRY_UPDATE_GOLDEN=1 rewrites it)"
    validate_strictly(out)
    # inject on its own output, with or without the flags, changes nothing: byte for byte.
    injected = tmp_path / "injected.yaml"
    injected.write_text(out)
    assert run_inject(injected) == out
    assert run_inject(injected, "--source", SOURCE, *MODE_FLAGS[mode]) == out


def pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"])
    return dict(doc["spec"]["template"]) if doc["kind"] != "Pod" else {"metadata": doc["metadata"], "spec": doc["spec"]}


def test_what_gets_injected_in_each_mode() -> None:
    classic = yaml.safe_load((GOLDEN / "deployment.classic.yaml").read_text())
    pod = pod_of(classic)
    spec = pod["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["infantry-install", "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["web", "exporter", "infantry-watch"]
    web, exporter = spec["containers"][:2]
    assert {"name": "infantry-configs", "mountPath": "/configs", "readOnly": True} in web["volumeMounts"]
    assert "volumeMounts" not in exporter  # infantry.dev/containers: web
    assert spec["shareProcessNamespace"] is True  # signalling by process name
    assert {"name": "infantry-configs", "emptyDir": {}} in spec["volumes"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"  # other annotations survive
    status = json.loads(pod["metadata"]["annotations"][STATUS])
    assert status["containers"] == ["infantry-watch"] and status["initContainers"] == ["infantry-install"]

    native = pod_of(yaml.safe_load((GOLDEN / "deployment.native.yaml").read_text()))["spec"]
    watch = native["initContainers"][0]
    assert watch["name"] == "infantry-watch" and watch["restartPolicy"] == "Always"
    assert "/configs/..data" in " ".join(watch["startupProbe"]["exec"]["command"])
    assert [c["name"] for c in native["containers"]] == ["web", "exporter"]
    assert "shareProcessNamespace" not in native  # no process name given: nothing to share

    for kind in ("job", "cronjob"):
        for mode in ("classic", "native"):
            job = pod_of(yaml.safe_load((GOLDEN / f"{kind}.{mode}.yaml").read_text()))["spec"]
            assert [c["name"] for c in job["initContainers"]] == ["infantry-install"]
            assert not any(c["name"] == "infantry-watch" for c in job["containers"])

    daemon = pod_of(yaml.safe_load((GOLDEN / "daemonset.classic.yaml").read_text()))["spec"]
    assert daemon["shareProcessNamespace"] is False  # a value the user set is never overwritten


def test_restricted_security_context_on_injected_containers() -> None:
    for golden in GOLDEN.glob("*.*.yaml"):
        for doc in yaml.safe_load_all(golden.read_text()):
            for item in doc["items"] if doc["kind"] == "List" else [doc]:
                if item["kind"] == "Service":
                    continue
                spec = pod_of(item)["spec"]
                for container in [*spec.get("initContainers", []), *spec["containers"]]:
                    if container["name"].startswith("infantry-"):
                        sc = container["securityContext"]
                        assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
                        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
                        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_a_changed_image_replaces_what_was_injected(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text(run_inject(GOLDEN / "deployment.yaml", "--source", SOURCE, "--process", "nginx"))
    second = yaml.safe_load(
        run_inject(first, "--source", SOURCE, "--process", "nginx", "--image", "registry.example/infantry:2")
    )
    spec = pod_of(second)["spec"]
    assert [c["name"] for c in spec["containers"]].count("infantry-watch") == 1
    assert [c["name"] for c in spec["initContainers"]].count("infantry-install") == 1
    assert [v["name"] for v in spec["volumes"]].count("infantry-configs") == 1
    assert sum(m["name"] == "infantry-configs" for m in spec["containers"][0]["volumeMounts"]) == 1
    assert {c["image"] for c in spec["containers"] if c["name"] == "infantry-watch"} == {"registry.example/infantry:2"}


def test_run_as_same_user_copies_the_app_uid() -> None:
    spec = {"securityContext": {"runAsUser": 101}, "containers": [{"name": "app", "image": "x",
            "securityContext": {"runAsUser": 1001, "runAsGroup": 2002}}]}  # fmt: skip
    options = InjectOptions(sources=(SOURCE,), image="infantry:1", run_as_same_user=True)
    new_spec, _ = inject_pod(spec, {}, options)
    watch = new_spec["containers"][-1]
    assert watch["securityContext"]["runAsUser"] == 1001 and watch["securityContext"]["runAsGroup"] == 2002
    with pytest.raises(InvalidAnnotation, match=r"infantry\.dev/run-as-same-user"):
        inject_pod({"containers": [{"name": "app", "image": "x"}]}, {}, options)


def test_annotate_only_marks_the_workload_for_the_webhook() -> None:
    out = yaml.safe_load(run_inject(GOLDEN / "deployment.yaml", "--annotate-only", "--source", SOURCE, "--native"))
    template = out["spec"]["template"]
    assert template["metadata"]["labels"]["infantry.dev/inject"] == "true"
    assert template["metadata"]["annotations"]["infantry.dev/source"] == SOURCE
    assert template["metadata"]["annotations"]["infantry.dev/mode"] == "native"
    assert [c["name"] for c in template["spec"]["containers"]] == ["web", "exporter"]  # nothing injected


@pytest.mark.parametrize(
    ("annotation", "value", "named"),
    [
        ("infantry.dev/mode", "sideways", "infantry.dev/mode"),
        ("infantry.dev/source", "ftp://nope/", "infantry.dev/source"),
        ("infantry.dev/containers", "missing", "infantry.dev/containers"),
        ("infantry.dev/memory", "lots", "infantry.dev/memory"),
        ("infantry.dev/install-only", "maybe", "infantry.dev/install-only"),
        ("infantry.dev/signal", "HUP", "infantry.dev/signal"),
        ("infantry.dev/mount-path", "relative/path", "infantry.dev/mount-path"),
        ("infantry.dev/interval", "-1", "infantry.dev/interval"),
        ("infantry.dev/wait", "5:1", "infantry.dev/wait"),
        ("infantry.dev/stale-after", "0", "infantry.dev/stale-after"),
        ("infantry.dev/file-mode", "0999", "infantry.dev/file-mode"),
        ("infantry.dev/max-file-size", "lots", "infantry.dev/max-file-size"),
        ("infantry.dev/layout", "sideways", "infantry.dev/layout"),
        ("infantry.dev/log-level", "loud", "infantry.dev/log-level"),
        ("infantry.dev/header", "no colon", "infantry.dev/header"),
        ("infantry.dev/client-cert", "/var/run/secrets/infantry/tls.crt", "infantry.dev/client-cert"),
        ("infantry.dev/ca-file", "ca.crt", "infantry.dev/ca-file"),
        ("infantry.dev/check", "test -d\nrm -rf /", "infantry.dev/check"),
        ("infantry.dev/template", "nope", "infantry.dev/template"),
        ("infantry.dev/secret", "Creds_1", "infantry.dev/secret"),
        ("infantry.dev/config-map", "../etc", "infantry.dev/config-map"),
        ("infantry.dev/health-port", "65536", "infantry.dev/health-port"),
        ("infantry.dev/secret-source", "yes", "infantry.dev/secret-source"),
    ],
)
def test_invalid_annotations_exit_2_naming_the_annotation(
    annotation: str, value: str, named: str, tmp_path: Path
) -> None:
    doc = yaml.safe_load((GOLDEN / "deployment.yaml").read_text())
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    annotations.update({"infantry.dev/inject": "true", "infantry.dev/source": SOURCE, annotation: value})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = infantry("inject", "-f", str(path))
    assert result.returncode == 2
    assert named in result.stderr and "document 1" in result.stderr


def test_opting_out_always_wins_and_other_kinds_pass_through(tmp_path: Path) -> None:
    doc = yaml.safe_load((GOLDEN / "deployment.yaml").read_text())
    doc["spec"]["template"]["metadata"]["annotations"]["infantry.dev/inject"] = "false"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all([doc, service]))
    result = infantry("inject", "-f", str(path), "--source", SOURCE)
    assert result.returncode == 0
    assert list(yaml.safe_load_all(result.stdout)) == [doc, service]
    assert "left alone" in result.stderr and "not a workload" in result.stderr


def test_unparsable_yaml_is_exit_2_with_the_document_index(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: v1\nkind: Service\n---\nkind: [unclosed\n")
    result = infantry("inject", "-f", str(path), "--source", SOURCE)
    assert result.returncode == 2
    assert "document 2 is not valid YAML" in result.stderr


def test_reads_standard_input() -> None:
    import subprocess
    import sys

    text = (GOLDEN / "pod.yaml").read_text()
    result = subprocess.run([sys.executable, "-m", "infantry", "inject", "--source", SOURCE], input=text,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0
    assert "infantry-watch" in result.stdout


def test_what_the_annotations_add_in_each_mode() -> None:
    for mode in ("classic", "native"):
        pod = pod_of(yaml.safe_load((GOLDEN / f"annotated.{mode}.yaml").read_text()))
        spec = pod["spec"]
        ours = [c for c in [*spec["initContainers"], *spec["containers"]] if c["name"].startswith("infantry-")]
        app = next(c for c in spec["containers"] if c["name"] == "billing")
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["infantry-configs"]["emptyDir"] == {"medium": "Memory"}  # infantry.dev/secret-source
        assert volumes["infantry-secret"]["secret"] == {"secretName": "billing-store-credentials"}
        assert volumes["infantry-config"]["configMap"] == {"name": "billing-infantry"}
        # The Secret and the config file are infantry's alone; the app sees only the configuration.
        assert [m["name"] for m in app["volumeMounts"]] == ["infantry-configs"]
        for container in ours:
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["infantry-secret"] == {"name": "infantry-secret", "mountPath": "/var/run/secrets/infantry",
                                                 "readOnly": True}  # fmt: skip
            assert mounts["infantry-config"]["mountPath"] == "/etc/infantry" and mounts["infantry-config"]["readOnly"]
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["INFANTRY_CONFIG"] == "/etc/infantry/infantry.yaml"
            assert env["INFANTRY_BEARER_TOKEN_FILE"] == "/var/run/secrets/infantry/token"
            assert env["INFANTRY_LOG_FORMAT"] == "json" and env["INFANTRY_MAX_FILES"] == "500"
            if container["args"] == ["install"]:
                assert env["INFANTRY_TIMEOUT"] == "120" and "INFANTRY_WAIT" not in env
                assert "livenessProbe" not in container and "INFANTRY_LISTEN" not in env
            else:
                assert env["INFANTRY_WAIT"] == "2:10" and env["INFANTRY_VERIFY_URL"] == "http://127.0.0.1:8080/healthz"
                assert "INFANTRY_TIMEOUT" not in env  # install's alone
                assert env["INFANTRY_LISTEN"] == "0.0.0.0:9090"
                assert container["ports"] == [{"name": "infantry-health", "containerPort": 9090}]
                assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9090}
                assert container["readinessProbe"]["httpGet"] == {"path": "/configured", "port": 9090}
                assert ("startupProbe" in container) == (mode == "native")
        status = json.loads(pod["metadata"]["annotations"][STATUS])
        assert status["volumes"] == ["infantry-configs", "infantry-secret", "infantry-config"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_flags_are_passed_on_as_variables_the_settings_read_back_the_same() -> None:
    flags = ["--interval", "2.5", "--wait", "1:4", "--header", "X-Tenant: shop", "--header", "X-Team: web",
             "--file-mode", "0600", "--max-total-size", "32MiB", "--stale-after", "90", "--layout", "direct",
             "--username", "reader", "--password-file", "/var/run/secrets/infantry/password", "--exec",
             "kill -HUP 1", "--reload-method", "PUT", "--template", "etcd://etcd:2379/app/nginx.conf.j2:nginx.conf",
             "--raw", "none", "--timeout", "300", "--secret", "store-auth"]  # fmt: skip
    out = yaml.safe_load(run_inject(GOLDEN / "pod.yaml", "--source", SOURCE, "--process", "nginx", *flags))
    pairs = list(zip(flags[::2], flags[1::2], strict=True))
    env = {"INFANTRY_" + flag[2:].upper().replace("-", "_"): value for flag, value in pairs if flag != "--header"}
    given = load_settings({}, {**env, "INFANTRY_HEADER": "X-Tenant: shop\nX-Team: web"})
    spec = out["spec"]
    install, watch = spec["initContainers"][0], spec["containers"][-1]
    assert env_of(watch)["INFANTRY_HEADER"] == "X-Tenant: shop\nX-Team: web"
    assert env_of(watch)["INFANTRY_INTERVAL"] == "2.5" and env_of(watch)["INFANTRY_FILE_MODE"] == "0600"
    assert env_of(watch)["INFANTRY_MAX_TOTAL_SIZE"] == str(32 << 20)
    assert "INFANTRY_TIMEOUT" in env_of(install) and "INFANTRY_EXEC" not in env_of(install)
    for container, names in ((install, options.INSTALL), (watch, options.WATCH)):
        settings = load_settings({}, env_of(container))
        for name in set(options.POD) & set(names):
            assert getattr(settings, name) == getattr(given, name), name
    assert {"name": "infantry-secret", "secret": {"secretName": "store-auth"}} in spec["volumes"]
    validate_strictly(yaml.safe_dump(out))


def test_annotate_only_writes_the_passed_on_flags_as_annotations() -> None:
    out = yaml.safe_load(run_inject(GOLDEN / "deployment.yaml", "--annotate-only", "--source", SOURCE, "--interval",
                                    "5", "--config-map", "web-infantry", "--health-port", "9100"))  # fmt: skip
    annotations = out["spec"]["template"]["metadata"]["annotations"]
    assert annotations["infantry.dev/interval"] == "5" and annotations["infantry.dev/config-map"] == "web-infantry"
    assert annotations["infantry.dev/health-port"] == "9100"
    assert "infantry.dev/wait" not in annotations  # only what was given


def test_health_port_zero_means_no_health_server_and_no_probes() -> None:
    for mode in ("classic", "native"):
        out = yaml.safe_load(run_inject(GOLDEN / "pod.yaml", "--source", SOURCE, f"--{mode}", "--health-port", "0"))
        spec = out["spec"]
        watch = next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == "infantry-watch")
        assert "INFANTRY_LISTEN" not in env_of(watch)
        assert not {"ports", "livenessProbe", "readinessProbe"} & set(watch)
        assert ("startupProbe" in watch) == (mode == "native")  # it reads the destination, not the server


def test_reinjecting_without_the_secret_and_config_map_takes_their_volumes_out(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text(run_inject(GOLDEN / "annotated.yaml", "--source", SOURCE))
    doc = yaml.safe_load(first.read_text())
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    for key in ("infantry.dev/secret", "infantry.dev/config-map", "infantry.dev/secret-source"):
        del annotations[key]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(doc))
    spec = pod_of(yaml.safe_load(run_inject(changed, "--source", SOURCE)))["spec"]
    assert spec["volumes"] == [{"name": "infantry-configs", "emptyDir": {}}]
    for container in [*spec["initContainers"], *spec["containers"]]:
        assert [m["name"] for m in container.get("volumeMounts", [])] in ([], ["infantry-configs"])
        assert "INFANTRY_CONFIG" not in env_of(container) if "env" in container else True
    # Taken out entirely, it is the workload as it was (with only the status changed).
    plain = yaml.safe_load((GOLDEN / "annotated.yaml").read_text())
    assert spec["containers"][0] == {**plain["spec"]["template"]["spec"]["containers"][0],
                                     "volumeMounts": [{"name": "infantry-configs", "mountPath": "/configs",
                                                       "readOnly": True}]}  # fmt: skip


def warnings_of(path: Path, *flags: str) -> list[str]:
    result = infantry("inject", "-f", str(path), *flags)
    assert result.returncode == 0, result.stderr
    return [line.partition(" WARNING infantry.cli: ")[2] for line in result.stderr.splitlines() if " WARNING " in line]


def test_warnings_on_stderr_for_what_keeps_signals_or_settings_from_working(tmp_path: Path) -> None:
    def pod_with(spec: dict[str, Any]) -> Path:
        path = tmp_path / "pod.yaml"
        doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
               "spec": {"containers": [{"name": "web", "image": "example/web:1"}], **spec}}  # fmt: skip
        path.write_text(yaml.safe_dump(doc))
        return path

    shared_off = warnings_of(pod_with({"shareProcessNamespace": False}), "--source", SOURCE, "--process", "nginx")
    assert any("shareProcessNamespace is false" in w and "'nginx'" not in w and "nginx" in w for w in shared_off)
    root = pod_with({"securityContext": {"runAsUser": 0}})
    assert any("container web runs as root" in w for w in warnings_of(root, "--source", SOURCE, "--process", "nginx"))
    other = pod_with({"securityContext": {"runAsUser": 1000},
                      "containers": [{"name": "web", "image": "x", "securityContext": {"runAsUser": 33}}]})  # fmt: skip
    said = warnings_of(other, "--source", SOURCE, "--process", "nginx")
    assert any("runs as UID 33" in w and "infantry.dev/run-as-same-user" in w for w in said)
    assert not any("UID" in w for w in warnings_of(other, "--source", SOURCE, "--process", "nginx",
                                                    "--run-as-same-user"))  # fmt: skip
    assert not any("UID" in w for w in warnings_of(other, "--source", SOURCE, "--reload-url", "http://127.0.0.1/"))
    same = pod_with({"securityContext": {"runAsUser": 1000}})
    assert not any("runs as" in w for w in warnings_of(same, "--source", SOURCE, "--process", "nginx"))
    native = warnings_of(same, "--source", SOURCE, "--native", "--timeout", "30")
    assert any("infantry.dev/timeout" in w and "native" in w for w in native)


def test_a_config_map_alone_names_the_sources_and_reinjecting_changes_nothing() -> None:
    options = InjectOptions(sources=(), image="infantry:1", config_map="web-infantry", mode="native")
    spec, annotations = inject_pod({"containers": [{"name": "web", "image": "x"}]}, {}, options)
    watch = spec["initContainers"][0]
    assert "INFANTRY_SOURCE" not in env_of(watch) and env_of(watch)["INFANTRY_CONFIG"] == "/etc/infantry/infantry.yaml"
    again, again_annotations = inject_pod(copy.deepcopy(spec), annotations, options)
    assert (again, again_annotations) == (spec, annotations)
    with pytest.raises(InvalidAnnotation, match=r"infantry\.dev/source: .*config-map"):
        parse_options({"image": "infantry:1"})


def test_a_template_the_variables_cannot_carry_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "inject.yaml"
    config.write_text("templates:\n  - {src: 'file:///etc/infantry/a.j2', dest: a.conf, mode: '0600'}\n")
    result = infantry("inject", "-f", str(GOLDEN / "pod.yaml"), "--source", SOURCE, "--config", str(config))
    assert result.returncode == 2 and "template: a.conf" in result.stderr and "config-map" in result.stderr
