"""`infantry inject`: golden outputs for every kind in both modes, idempotency, and annotation handling."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infantry.errors import InvalidAnnotation
from infantry.inject import STATUS, InjectOptions, inject_pod
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
