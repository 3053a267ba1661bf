"""`infantry inject` fed what a hostile or careless author writes: clashing names, forged status, alias
bombs, wrongly shaped documents and URLs with passwords. Every refusal is exit 2 and one line."""

from __future__ import annotations

import copy
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from infantry.errors import SettingsError
from infantry.inject import (
    MAX_DEPTH,
    MAX_INPUT_BYTES,
    OPTION_KEYS,
    STATUS,
    InjectOptions,
    annotation_values,
    inject_document,
    inject_pod,
    load_documents,
    option_values,
    parse_options,
    read_documents,
)
from infantry.settings import Settings, env_name, load_settings
from tests.support import infantry

SOURCE = "etcd://etcd.config.svc:2379/app/"
SECRET = "R3loadPass"


def deployment(spec: Any = None, annotations: Any = None, labels: Any = None) -> dict[str, Any]:
    """An opted-in Deployment; each part can be replaced by something wrongly shaped."""
    template: dict[str, Any] = {
        "metadata": {
            "labels": {"app": "web", "infantry.dev/inject": "true"} if labels is None else labels,
            "annotations": {"infantry.dev/source": SOURCE} if annotations is None else annotations,
        },
        "spec": {"containers": [{"name": "web", "image": "nginxinc/nginx-unprivileged:1.27-alpine"}]}
        if spec is None
        else spec,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template},
    }


def run_refused(tmp_path: Path, text: str) -> str:
    """Run inject on ``text``; it must exit 2 with one error line and no traceback. Returns that line."""
    path = tmp_path / "in.yaml"
    path.write_text(text)
    result = infantry("inject", "-f", str(path))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert all(" WARNING " in line for line in result.stderr.splitlines() if line not in errors), result.stderr
    assert result.stdout == ""
    return errors[0]


def app(name: str, image: str = "example/app:1", **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": image, **fields}


@pytest.mark.parametrize(
    ("spec", "field", "name"),
    [
        (
            {"containers": [app("web")], "volumes": [{"name": "infantry-configs", "configMap": {"name": "c"}}]},
            "spec.template.spec.volumes[0]",
            "infantry-configs",
        ),
        ({"containers": [app("web"), app("infantry-watch")]}, "spec.template.spec.containers[1]", "infantry-watch"),
        (
            {"containers": [app("web")], "initContainers": [app("infantry-install")]},
            "spec.template.spec.initContainers[0]",
            "infantry-install",
        ),
    ],
    ids=["volume", "container", "init-container"],
)
def test_a_pod_already_using_a_name_infantry_adds_is_refused(
    tmp_path: Path, spec: dict[str, Any], field: str, name: str
) -> None:
    line = run_refused(tmp_path, yaml.safe_dump(deployment(spec)))
    assert "document 1" in line and field in line and f"named {name}" in line


def test_a_forged_status_never_takes_out_the_apps_own_objects() -> None:
    """The status annotation names objects; only those that are exactly infantry's own go."""
    spec = {
        "shareProcessNamespace": True,
        "initContainers": [app("migrate", args=["install"])],
        "containers": [app("web", args=["watch"], volumeMounts=[{"name": "data", "mountPath": "/data"}])],
        "volumes": [{"name": "data", "emptyDir": {}}],
    }
    forged = {
        "image": "example/app:1",
        "initContainers": ["migrate"],
        "containers": ["web"],
        "volumes": ["data"],
        "mounts": ["web"],
        "shareProcessNamespace": True,
    }
    options = InjectOptions(sources=(SOURCE,), image="infantry:1")
    new_spec, _ = inject_pod(copy.deepcopy(spec), {STATUS: json.dumps(forged)}, options)
    assert [c["name"] for c in new_spec["initContainers"]] == ["infantry-install", "migrate"]
    assert [c["name"] for c in new_spec["containers"]] == ["web", "infantry-watch"]
    assert [v["name"] for v in new_spec["volumes"]] == ["data", "infantry-configs"]
    assert {"name": "data", "mountPath": "/data"} in new_spec["containers"][0]["volumeMounts"]
    assert new_spec["shareProcessNamespace"] is True

    # The app's own container called infantry-watch, even of the recorded image, is not infantry's:
    # it stays, and the pod is refused rather than given a second one.
    own = {"containers": [app("web"), app("infantry-watch", image="example/metrics:2", args=["--port=9100"])]}
    claim = {"image": "example/metrics:2", "containers": ["infantry-watch"], "volumes": ["infantry-configs"]}
    with pytest.raises(SettingsError, match=r"spec\.containers\[1\]: .*named infantry-watch"):
        inject_pod(own, {STATUS: json.dumps(claim)}, options)


def test_what_infantry_injected_is_still_recognised_and_replaced() -> None:
    """The other side of the forged-status test: a real injection, under a bumped tag, is taken out."""
    spec = {"containers": [app("web")]}
    first, annotations = inject_pod(spec, {}, InjectOptions(sources=(SOURCE,), image="infantry:1", process="nginx"))
    for container in [*first["containers"], *first["initContainers"]]:
        if container["name"].startswith("infantry-"):
            container["image"] = "infantry:1.0.1"  # edited by hand since: the same image family
    again, _ = inject_pod(first, annotations, InjectOptions(sources=(SOURCE,), image="infantry:2", process="nginx"))
    assert [c["name"] for c in again["containers"]] == ["web", "infantry-watch"]
    assert [c["name"] for c in again["initContainers"]] == ["infantry-install"]
    assert [v["name"] for v in again["volumes"]] == ["infantry-configs"]
    assert [m["name"] for m in again["containers"][0]["volumeMounts"]] == ["infantry-configs"]
    assert {c["image"] for c in again["containers"] if c["name"] == "infantry-watch"} == {"infantry:2"}


BOMB_ANCHORS = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)
]


def bomb_document(where: str) -> str:
    """A Deployment whose annotation value, or container args, is 10**10 strings once expanded."""
    lols = "\n".join("  " + line for line in BOMB_ANCHORS)
    annotation = "*l9" if where == "annotation" else json.dumps(SOURCE)
    args = "*l9" if where == "args" else "[]"
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels:
{lols}
spec:
  template:
    metadata:
      labels: {{infantry.dev/inject: "true"}}
      annotations:
        infantry.dev/source: {annotation}
    spec:
      containers:
        - name: web
          image: example/app:1
          args: {args}
"""


def test_an_alias_bomb_in_an_annotation_is_refused_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    line = run_refused(tmp_path, bomb_document("annotation"))
    assert "document 1" in line
    assert time.monotonic() - started < 20  # seconds, not minutes; a bug would run out of memory


@pytest.mark.parametrize("where", ["annotation", "args"])
def test_alias_bombs_anywhere_are_refused_while_loading(where: str) -> None:
    started = time.monotonic()
    with pytest.raises(SettingsError, match=r"^file: document 1 is refused: more than \d+ nodes"):
        load_documents(bomb_document(where))
    assert time.monotonic() - started < 5


def test_merge_key_bombs_recursive_aliases_and_deep_nesting_are_refused_while_loading() -> None:
    merges = ["m0: &m0 {a: 1, b: 2}"] + [
        f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}" for i in range(1, 12)
    ]
    cases = {
        "\n".join(merges): "nodes once aliases are expanded",
        "a: &a [1, *a]": "refers to a node that holds it",
        "[" * 50_000 + "]" * 50_000: f"nested more than {MAX_DEPTH} levels",
        "d: &d " + "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2) + "\ne: [[[*d]]]": f"nested more than {MAX_DEPTH}",
    }
    for text, reason in cases.items():
        started = time.monotonic()
        with pytest.raises(SettingsError, match=r"^file: document 1 is refused") as caught:
            load_documents(text)
        assert reason in str(caught.value) and "\n" not in str(caught.value)
        assert time.monotonic() - started < 5


def test_ordinary_anchors_and_merge_keys_still_load() -> None:
    text = "base: &base {image: example/app:1, ports: [80]}\nweb: {<<: *base, name: web}\nalso: *base\n---\n- x\n"
    assert load_documents(text) == [
        {
            "base": {"image": "example/app:1", "ports": [80]},
            "web": {"image": "example/app:1", "ports": [80], "name": "web"},
            "also": {"image": "example/app:1", "ports": [80]},
        },
        ["x"],
    ]
    with pytest.raises(SettingsError, match=r"^file: document 2 is not valid YAML"):
        load_documents("a: 1\n---\nkind: [unclosed\n")


def test_input_over_the_size_cap_is_refused_without_reading_it_all() -> None:
    class Endless(io.StringIO):
        """Standard input that never ends; counts what was asked of it."""

        asked = 0

        def read(self, size: int | None = -1, /) -> str:
            assert size is not None and size >= 0, "read without a bound"
            self.asked += size
            return "#" * size

    stdin = Endless()
    with pytest.raises(SettingsError, match=r"^file: the input is over \d+ MiB"):
        read_documents("-", stdin)
    assert stdin.asked == MAX_INPUT_BYTES + 1


WRONG_SHAPES: list[tuple[str, dict[str, Any], str]] = [
    ("container-is-a-string", deployment({"containers": ["web"]}), "spec.template.spec.containers[0]: expected a"),
    ("containers-not-a-list", deployment({"containers": {"name": "web"}}), "spec.template.spec.containers: expected"),
    ("no-containers", deployment({"volumes": []}), "spec.template.spec.containers: expected"),
    ("spec-not-a-mapping", {**deployment(), "spec": "web"}, "spec: expected a mapping, got a string"),
    ("pod-spec-a-list", deployment([1, 2]), "spec.template.spec: expected a mapping, got a list"),
    ("annotations-a-list", deployment(annotations=["a"]), "spec.template.metadata.annotations: expected a mapping"),
    ("labels-a-string", deployment(labels="app=web"), "spec.template.metadata.labels: expected a mapping"),
    (
        "annotation-value-a-mapping",
        deployment(annotations={"infantry.dev/source": {"url": SOURCE}}),
        "spec.template.metadata.annotations.infantry.dev/source: expected a string, got a mapping",
    ),
    ("metadata-a-string", {**deployment(), "metadata": "web"}, "metadata: expected a mapping, got a string"),
    (
        "mounts-a-string",
        deployment({"containers": [app("web", volumeMounts="/data")]}),
        "spec.template.spec.containers[0].volumeMounts: expected a list",
    ),
    (
        "volume-without-a-name",
        deployment({"containers": [app("web")], "volumes": [{"emptyDir": {}}]}),
        "spec.template.spec.volumes[0].name: expected a string, got nothing",
    ),
    (
        "cronjob-template-a-string",
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"}, "spec": {"jobTemplate": "x"}},
        "spec.jobTemplate: expected a mapping",
    ),
    ("list-items-a-mapping", {"apiVersion": "v1", "kind": "List", "items": {"a": 1}}, "items: expected a list"),
]


@pytest.mark.parametrize(("doc", "field"), [case[1:] for case in WRONG_SHAPES], ids=[c[0] for c in WRONG_SHAPES])
def test_a_wrongly_shaped_document_is_exit_2_naming_the_document_and_the_field(
    tmp_path: Path, doc: dict[str, Any], field: str
) -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {}}
    line = run_refused(tmp_path, yaml.safe_dump_all([service, doc]))
    assert "document 2" in line and field in line


def test_rejected_urls_are_never_echoed_with_their_password(tmp_path: Path) -> None:
    cases = [
        ("infantry.dev/source", f"ftp://deploy:{SECRET}@store.example/app?token={SECRET}", "ftp://deploy:***@"),
        ("infantry.dev/reload-url", f"ftp://admin:{SECRET}@127.0.0.1:8080/-/reload", "ftp://admin:***@"),
        ("infantry.dev/reload-url", f"http://admin:{SECRET}@[::1/-/reload", "'http://…'"),
    ]
    for annotation, url, shown in cases:
        annotations = {"infantry.dev/source": SOURCE, annotation: url}
        line = run_refused(tmp_path, yaml.safe_dump(deployment(annotations=annotations)))
        assert annotation in line and "document 1" in line
        assert SECRET not in line
        assert shown in line  # what can be shown is, so the user can find it


SETTINGS = load_settings({"source": [SOURCE], "image": "infantry:test"}, {})
SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                      max_size=3), max_leaves=8)  # fmt: skip
T = ("spec", "template")
PLACES = [
    ("spec",), T, (*T, "metadata"), (*T, "metadata", "labels"), (*T, "metadata", "annotations"),
    (*T, "metadata", "annotations", "infantry.dev/source"), (*T, "metadata", "annotations", "infantry.dev/status"),
    (*T, "spec"), (*T, "spec", "containers"), (*T, "spec", "containers", 0), (*T, "spec", "containers", 0, "name"),
    (*T, "spec", "containers", 0, "volumeMounts"), (*T, "spec", "volumes"), (*T, "spec", "initContainers"),
    (*T, "spec", "securityContext"), ("metadata",), ("kind",), (*T, "metadata", "annotations", "infantry.dev/secret"),
    (*T, "metadata", "annotations", "infantry.dev/health-port"), (*T, "metadata", "annotations", "infantry.dev/wait"),
    (*T, "metadata", "annotations", "infantry.dev/process"), (*T, "spec", "shareProcessNamespace"),
]  # fmt: skip


def step(target: Any, key: str | int) -> Any:
    """``target[key]``, made a mapping if missing; None where the path no longer leads anywhere."""
    if isinstance(target, dict) and isinstance(key, str):
        return target.setdefault(key, {})
    if isinstance(target, list) and isinstance(key, int) and key < len(target):
        return target[key]
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PLACES), VALUES), min_size=1, max_size=3))
def test_any_value_anywhere_is_injected_or_refused_with_a_settings_error(changes: list[tuple[Any, Any]]) -> None:
    doc: Any = deployment()
    for place, value in changes:
        target: Any = doc
        for key in place[:-1]:
            target = step(target, key)
        if isinstance(target, dict) or step(target, place[-1]) is not None:
            target[place[-1]] = value
    try:
        out = inject_document(doc, SETTINGS, annotate_only=False, warn=lambda _: None, where="document 1")
    except SettingsError as exc:
        message = str(exc)
    else:
        yaml.safe_dump(out)  # whatever came out can be written
        return
    assert "\n" not in message and "document 1" in message


def test_an_alias_bomb_anywhere_is_refused_by_the_command(tmp_path: Path) -> None:
    line = run_refused(tmp_path, bomb_document("args"))
    assert "document 1 is refused" in line


@pytest.mark.parametrize(("annotation", "volume"), [("secret", "infantry-secret"), ("config-map", "infantry-config")])
def test_a_pod_with_a_volume_named_like_the_secret_or_config_volume_is_refused_only_when_it_is_added(
    tmp_path: Path, annotation: str, volume: str
) -> None:
    spec = {"containers": [app("web")], "volumes": [{"name": volume, "emptyDir": {}}]}
    annotations = {"infantry.dev/source": SOURCE, f"infantry.dev/{annotation}": "store-auth"}
    line = run_refused(tmp_path, yaml.safe_dump(deployment(spec, annotations)))
    assert "spec.template.spec.volumes[0]" in line and f"named {volume}" in line
    options = InjectOptions(sources=(SOURCE,), image="infantry:1")
    new_spec, _ = inject_pod(copy.deepcopy(spec), {}, options)
    assert [v["name"] for v in new_spec["volumes"]] == [volume, "infantry-configs"]  # the app's own, untouched


def test_a_health_port_the_app_already_uses_is_refused_naming_the_annotation(tmp_path: Path) -> None:
    spec = {"containers": [app("web", ports=[{"containerPort": 8086}])]}
    line = run_refused(tmp_path, yaml.safe_dump(deployment(spec)))
    assert "infantry.dev/health-port" in line and "containers[0] already uses port 8086" in line
    moved = {"infantry.dev/source": SOURCE, "infantry.dev/health-port": "9100"}
    out = inject_document(deployment(spec, moved), SETTINGS, annotate_only=False, warn=lambda _: None, where="d")
    assert out["spec"]["template"]["spec"]["containers"][-1]["ports"][0]["containerPort"] == 9100


def test_a_forged_status_never_takes_out_the_apps_own_secret_or_config_map() -> None:
    options = InjectOptions(sources=(SOURCE,), image="infantry:1", secret="creds")
    first, annotations = inject_pod({"containers": [app("web")]}, {}, options)
    # The app adds a Secret volume of its own, under a name of its own, and the status is forged to claim it.
    first["volumes"].append({"name": "app-creds", "secret": {"secretName": "creds"}})
    status = json.loads(annotations[STATUS])
    status["volumes"].append("app-creds")
    again, _ = inject_pod(first, {STATUS: json.dumps(status)}, InjectOptions(sources=(SOURCE,), image="infantry:1"))
    assert [v["name"] for v in again["volumes"]] == ["app-creds", "infantry-configs"]


GOOD_VALUES = {
    "interval": "5", "wait": "1:2", "secret": "creds", "config-map": "web-infantry", "health-port": "9100",
    "header": "X-A: b\nX-C: d", "ca-file": "/var/run/secrets/infantry/ca.crt", "secret-source": "true",
    "template": "file:///etc/infantry/a.j2:a.conf\nfile:///etc/infantry/b.j2:b.conf", "max-files": "10",
}  # fmt: skip
KEYS = st.sampled_from([*OPTION_KEYS, "FOO_BAR", "secret ", "../secret", "secret\nx", "status"])
TEXTS = st.text(max_size=30) | st.sampled_from([*GOOD_VALUES.values(), "a\nb", "x" * 5000, "/etc/passwd", "0"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(sorted(GOOD_VALUES)), unique=True),
    st.dictionaries(KEYS, TEXTS, max_size=2),
    st.sampled_from(["classic", "native", "install-only"]),
)
def test_annotations_add_only_infantrys_variables_volumes_and_one_line_values(
    good: list[str], hostile: dict[str, str], mode: str
) -> None:
    values = {**{key: GOOD_VALUES[key] for key in good}, **hostile}
    annotations = {"infantry.dev/source": SOURCE, **{f"infantry.dev/{key}": text for key, text in values.items()}}
    try:
        options = parse_options({**option_values(SETTINGS, only_set=False), **annotation_values(annotations),
                                 "mode": "native" if mode == "native" else "classic",
                                 "install-only": str(mode == "install-only").lower()})  # fmt: skip
        spec, _ = inject_pod({"containers": [app("web")]}, annotations, options)
    except SettingsError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert "\n" not in message
        return
    known = {env_name(name) for name in Settings.model_fields}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for variable in container.get("env", []):
            assert variable["name"] in known
            assert "\n" not in variable["value"] or variable["name"] == "INFANTRY_HEADER"
            assert variable["value"].replace("\n", " ").isprintable() and len(variable["value"]) <= 4096
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(volumes) <= {"infantry-configs", "infantry-secret", "infantry-config"}
    name = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
    if "infantry-secret" in volumes:
        assert volumes["infantry-secret"]["secret"] == {"secretName": values["secret"]}
        assert name.fullmatch(values["secret"]) and len(values["secret"]) <= 253
    if "infantry-config" in volumes:
        assert volumes["infantry-config"]["configMap"] == {"name": values["config-map"]}
        assert name.fullmatch(values["config-map"])
    assert yaml.safe_load(yaml.safe_dump(spec)) == spec
