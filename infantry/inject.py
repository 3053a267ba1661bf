"""Adding infantry to workloads: a pure transformation of pod specs, shared by `inject` and `webhook`.

Pod specs are plain dicts, so fields infantry does not know survive untouched. What was injected is
recorded in the ``infantry.dev/status`` annotation; injecting again first takes exactly that out, so
the result never holds two copies, and injecting an injected pod with the same options changes nothing.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from infantry.errors import InvalidAnnotation, SettingsError
from infantry.settings import SCHEMES, Settings, load_settings

PREFIX = "infantry.dev/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
VOLUME = "infantry-configs"
INSTALL = "infantry-install"
WATCH = "infantry-watch"
HEALTH_PORT = 8086
OPTION_KEYS = (
    "source", "mount-path", "containers", "signal", "process", "reload-url", "mode", "install-only",
    "image", "cpu", "memory", "run-as-same-user",
)  # fmt: skip
POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
INSTALL_ONLY_KINDS = ("Job", "CronJob")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_TRUE_FALSE = {"true": True, "false": False}

Json = dict[str, Any]


@dataclass(frozen=True)
class InjectOptions:
    """Everything that decides what is injected, already validated."""

    sources: tuple[str, ...]
    image: str
    mount_path: str = "/configs"
    containers: tuple[str, ...] = ()
    signal: str | None = None
    process: str | None = None
    reload_url: str | None = None
    mode: Literal["classic", "native"] = "classic"
    install_only: bool = False
    cpu: str = "10m"
    memory: str = "128Mi"
    run_as_same_user: bool = False


def opted_in(labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool | None:
    """True or False when the pod says (label or annotation; "false" always wins), None when silent."""
    said = {str(labels.get(INJECT, "")).lower(), str(annotations.get(INJECT, "")).lower()}
    if "false" in said:
        return False
    return True if "true" in said else None


def option_values(settings: Settings, *, only_set: bool) -> dict[str, str]:
    """Settings in annotation form: all of them, or only those given by flag, environment or file."""
    values = {
        "source": " ".join(spec.url for spec in settings.source),
        "mount-path": settings.mount_path,
        "containers": ",".join(settings.containers),
        "mode": settings.mode,
        "install-only": str(settings.install_only).lower(),
        "image": settings.image,
        "cpu": settings.cpu,
        "memory": settings.memory,
        "run-as-same-user": str(settings.run_as_same_user).lower(),
        "signal": settings.signal,
        "process": settings.process or "",
        "reload-url": settings.reload_url or "",
    }
    if not only_set:
        values["signal"] = ""  # HUP is the default only once a process is named
        return {key: value for key, value in values.items() if value}
    given = {name.replace("_", "-") for name in settings.model_fields_set}
    return {key: value for key, value in values.items() if key in given and value}


def annotation_values(annotations: Mapping[str, str]) -> dict[str, str]:
    """The pod's ``infantry.dev/`` options, keyed without the prefix."""
    return {key: str(annotations[PREFIX + key]) for key in OPTION_KEYS if PREFIX + key in annotations}


def parse_options(values: Mapping[str, str], *, install_only_kind: bool = False) -> InjectOptions:
    """Validate option values; a bad one raises InvalidAnnotation naming ``infantry.dev/<key>``."""

    def bad(key: str, message: str) -> InvalidAnnotation:
        return InvalidAnnotation(PREFIX + key, message)

    def flag(key: str) -> bool:
        raw = values.get(key, "false").strip().lower()
        if raw not in _TRUE_FALSE:
            raise bad(key, f"expected true or false, got {values[key]!r}")
        return _TRUE_FALSE[raw]

    sources = tuple(values.get("source", "").replace(",", " ").split())
    if not sources:
        raise bad("source", "at least one source URL is required")
    for url in sources:
        if urlsplit(url).scheme not in SCHEMES:
            raise bad("source", f"unsupported source URL {url!r} (supported schemes: {', '.join(SCHEMES)})")
    mount_path = values.get("mount-path", "/configs")
    if not mount_path.startswith("/") or ".." in mount_path.split("/") or mount_path == "/":
        raise bad("mount-path", f"expected an absolute directory path, got {mount_path!r}")
    mode = values.get("mode", "classic")
    if mode not in ("classic", "native"):
        raise bad("mode", f"expected classic or native, got {mode!r}")
    for key in ("cpu", "memory"):
        if key in values and not _QUANTITY.match(values[key]):
            raise bad(key, f"expected a Kubernetes quantity like 10m or 64Mi, got {values[key]!r}")
    image = values.get("image", "")
    if not image or any(ch.isspace() for ch in image):
        raise bad("image", f"expected an image reference, got {image!r}")
    if values.get("signal") and not values.get("process"):
        raise bad("signal", "a signal needs infantry.dev/process to say which process gets it")
    options = InjectOptions(
        sources=sources,
        image=image,
        mount_path=mount_path.rstrip("/"),
        containers=tuple(n for n in values.get("containers", "").replace(",", " ").split() if n),
        signal=(values.get("signal") or "HUP") if values.get("process") else None,
        process=values.get("process") or None,
        reload_url=values.get("reload-url") or None,
        mode="native" if mode == "native" else "classic",
        install_only=install_only_kind or flag("install-only"),
        cpu=values.get("cpu", "10m"),
        memory=values.get("memory", "128Mi"),
        run_as_same_user=flag("run-as-same-user"),
    )
    _check_with_settings(options)
    return options


_ENV_TO_KEY = {
    "INFANTRY_SOURCE": "source",
    "INFANTRY_DEST": "mount-path",
    "INFANTRY_SIGNAL": "signal",
    "INFANTRY_PROCESS": "process",
    "INFANTRY_RELOAD_URL": "reload-url",
}


def _check_with_settings(options: InjectOptions) -> None:
    """The injected containers' settings must be ones infantry itself accepts."""
    try:
        load_settings({}, _watch_env(options))
    except SettingsError as exc:
        text = str(exc)
        key = next((k for var, k in _ENV_TO_KEY.items() if var in text), "source")
        raise InvalidAnnotation(PREFIX + key, text) from None


def _install_env(options: InjectOptions) -> dict[str, str]:
    return {"INFANTRY_SOURCE": " ".join(options.sources), "INFANTRY_DEST": options.mount_path}


def _watch_env(options: InjectOptions) -> dict[str, str]:
    env = _install_env(options)
    env["INFANTRY_LISTEN"] = f"0.0.0.0:{HEALTH_PORT}"
    if options.process:
        env["INFANTRY_PROCESS"] = options.process
        env["INFANTRY_SIGNAL"] = options.signal or "HUP"
    if options.reload_url:
        env["INFANTRY_RELOAD_URL"] = options.reload_url
    return env


def _security_context(options: InjectOptions, spec: Json, targets: list[Json]) -> Json:
    context: Json = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if options.run_as_same_user:
        pod_context = spec.get("securityContext") or {}
        app_context = (targets[0].get("securityContext") or {}) if targets else {}
        uid = app_context.get("runAsUser", pod_context.get("runAsUser"))
        if uid is None:
            raise InvalidAnnotation(
                PREFIX + "run-as-same-user", "the app container and the pod set no runAsUser to copy"
            )
        context["runAsUser"] = uid
        gid = app_context.get("runAsGroup", pod_context.get("runAsGroup"))
        if gid is not None:
            context["runAsGroup"] = gid
    return context


def _container(name: str, args: list[str], env: Mapping[str, str], options: InjectOptions, context: Json) -> Json:
    return {
        "name": name,
        "image": options.image,
        "args": args,
        "env": [{"name": key, "value": value} for key, value in env.items()],
        "volumeMounts": [{"name": VOLUME, "mountPath": options.mount_path}],
        "resources": {
            "requests": {"cpu": options.cpu, "memory": options.memory},
            "limits": {"memory": options.memory},
        },
        "securityContext": copy.deepcopy(context),
    }


def _with_probes(container: Json, options: InjectOptions, *, startup: bool) -> Json:
    container["ports"] = [{"name": "infantry-health", "containerPort": HEALTH_PORT}]
    container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": HEALTH_PORT}, "periodSeconds": 10,
                                  "failureThreshold": 6}  # fmt: skip
    # No readinessProbe: a sidecar's readiness gates the pod's, and a change being published (or refused
    # by the check) must not take a serving pod out of its Service. /readyz is for dashboards and alerts.
    if startup:
        check = f"import os, sys; sys.exit(not os.path.exists({options.mount_path + '/..data'!r}))"
        container["startupProbe"] = {"exec": {"command": ["python", "-c", check]}, "periodSeconds": 1,
                                     "failureThreshold": 300}  # fmt: skip
    return container


def remove_injected(spec: Json, annotations: Mapping[str, str]) -> Json:
    """A copy of ``spec`` without what the status annotation says infantry added."""
    spec = copy.deepcopy(spec)
    try:
        status = json.loads(annotations.get(STATUS, "{}"))
    except ValueError:
        status = {}
    if not isinstance(status, dict):
        return spec
    for field in ("initContainers", "containers"):
        names = set(status.get(field, []))
        if names and field in spec:
            spec[field] = [c for c in spec[field] if c.get("name") not in names]
    volumes = set(status.get("volumes", []))
    if volumes and "volumes" in spec:
        spec["volumes"] = [v for v in spec["volumes"] if v.get("name") not in volumes]
    mounted = set(status.get("mounts", []))
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if container.get("name") in mounted and "volumeMounts" in container:
            container["volumeMounts"] = [m for m in container["volumeMounts"] if m.get("name") not in volumes]
    if status.get("shareProcessNamespace"):
        spec.pop("shareProcessNamespace", None)
    return spec


def inject_pod(spec: Json, annotations: Mapping[str, str], options: InjectOptions) -> tuple[Json, dict[str, str]]:
    """The pod spec and annotations with infantry added (after taking out any earlier injection)."""
    spec = remove_injected(spec, annotations)
    annotations = dict(annotations)
    apps = spec.get("containers") or []
    names = [c.get("name") for c in apps]
    unknown = [n for n in options.containers if n not in names]
    if unknown:
        raise InvalidAnnotation(PREFIX + "containers", f"no container named {', '.join(unknown)} in this pod")
    targets = [c for c in apps if not options.containers or c.get("name") in options.containers]
    for container in targets:
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath", "").rstrip("/") == options.mount_path:
                raise InvalidAnnotation(
                    PREFIX + "mount-path",
                    f"container {container['name']} already mounts something at {options.mount_path}",
                )
        container.setdefault("volumeMounts", []).append(
            {"name": VOLUME, "mountPath": options.mount_path, "readOnly": True}
        )
    spec.setdefault("volumes", []).append({"name": VOLUME, "emptyDir": {}})
    context = _security_context(options, spec, targets)
    init = spec.setdefault("initContainers", [])
    injected_init: list[str] = []
    injected: list[str] = []
    if options.install_only:
        init.insert(0, _container(INSTALL, ["install"], _install_env(options), options, context))
        injected_init.append(INSTALL)
    elif options.mode == "native":
        watch = _container(WATCH, ["watch"], _watch_env(options), options, context)
        watch["restartPolicy"] = "Always"
        init.insert(0, _with_probes(watch, options, startup=True))
        injected_init.append(WATCH)
    else:
        init.insert(0, _container(INSTALL, ["install"], _install_env(options), options, context))
        injected_init.append(INSTALL)
        # Appended last, so `kubectl logs` and `kubectl exec` still default to the app.
        apps.append(_with_probes(_container(WATCH, ["watch"], _watch_env(options), options, context), options,
                                 startup=False))  # fmt: skip
        spec["containers"] = apps
        injected.append(WATCH)
    set_share = bool(options.process) and not options.install_only and "shareProcessNamespace" not in spec
    if set_share:
        spec["shareProcessNamespace"] = True
    status = {
        "image": options.image,
        "mode": "install-only" if options.install_only else options.mode,
        "initContainers": injected_init,
        "containers": injected,
        "volumes": [VOLUME],
        "mounts": [c["name"] for c in targets],
        "shareProcessNamespace": set_share,
    }
    annotations[STATUS] = json.dumps(status, sort_keys=True, separators=(",", ":"))
    return spec, annotations


Warn = Callable[[str], None]


def pod_template(doc: Json) -> tuple[Json, Json] | None:
    """The (metadata, spec) of the pod a workload makes, or None for kinds that make no pods."""
    kind = doc.get("kind")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return None
    if kind == "Pod":
        return doc.setdefault("metadata", {}), spec
    if kind in POD_TEMPLATE_KINDS:
        template = spec.get("template")
    elif kind == "CronJob":
        template = (spec.get("jobTemplate") or {}).get("spec", {}).get("template")
    else:
        return None
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return None
    return template.setdefault("metadata", {}), template["spec"]


def inject_document(doc: Any, settings: Settings, *, annotate_only: bool, warn: Warn, where: str) -> Any:
    """One YAML document with infantry injected into each workload it holds; other kinds pass through."""
    if not isinstance(doc, dict):
        return doc
    doc = copy.deepcopy(doc)
    if doc.get("kind") == "List":
        doc["items"] = [
            inject_document(item, settings, annotate_only=annotate_only, warn=warn, where=f"{where} item {i}")
            for i, item in enumerate(doc.get("items") or [])
        ]
        return doc
    name = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
    found = pod_template(doc)
    if found is None:
        warn(f"{where} ({name}): not a workload; passed through unchanged")
        return doc
    metadata, spec = found
    labels = metadata.get("labels") or {}
    annotations = {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()}
    overrides = option_values(settings, only_set=True)
    said = opted_in(labels, annotations)
    if said is False:
        warn(f'{where} ({name}): {INJECT} is "false"; left alone')
        return doc
    if said is None and "source" not in overrides:
        warn(f"{where} ({name}): not opted in and no --source given; left alone")
        return doc
    if annotate_only:
        metadata["labels"] = {**labels, INJECT: "true"}
        metadata["annotations"] = {**annotations, **{PREFIX + k: v for k, v in overrides.items()}}
        return doc
    values = {**option_values(settings, only_set=False), **annotation_values(annotations), **overrides}
    try:
        options = parse_options(values, install_only_kind=doc.get("kind") in INSTALL_ONLY_KINDS)
        new_spec, new_annotations = inject_pod(spec, annotations, options)
    except InvalidAnnotation as exc:
        raise InvalidAnnotation(exc.annotation, f"{exc.detail} (in {where}, {name})") from None
    spec.clear()
    spec.update(new_spec)
    metadata["annotations"] = new_annotations
    return doc
