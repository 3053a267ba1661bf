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
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import yaml
from pydantic import ByteSize, ValidationError

from infantry import options as commands
from infantry.errors import InvalidAnnotation, SettingsError
from infantry.settings import (
    SCHEMES,
    Origins,
    Settings,
    Wait,
    describe_validation_error,
    env_name,
    read_environment,
    redact_url,
)

PREFIX = "infantry.dev/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
VOLUME = "infantry-configs"
INSTALL = "infantry-install"
WATCH = "infantry-watch"
SECRET_VOLUME = "infantry-secret"  # noqa: S105  (a volume name)
CONFIG_VOLUME = "infantry-config"
SECRET_PATH = "/var/run/secrets/infantry"  # noqa: S105  (a mount path)
CONFIG_DIR = "/etc/infantry"
CONFIG_FILE = CONFIG_DIR + "/infantry.yaml"
HEALTH_PORT = 8086
# The settings passed on as they are, by their annotation keys: install's and watch's (options.POD), and
# the log settings, which inject and the webhook take for their own logging and so only as annotations.
PASSED_ON = (*commands.POD, "log_format", "log_level")
OPTION_KEYS = (
    "source", "mount-path", "containers", "signal", "process", "reload-url", "mode", "install-only",
    "image", "cpu", "memory", "run-as-same-user", "health-port", "secret", "config-map", "secret-source",
    *(name.replace("_", "-") for name in PASSED_ON),
)  # fmt: skip
MAX_VALUE_CHARS = 4096
_FILE_SETTINGS = ("fallback", "bearer_token_file", "password_file", "ca_file", "client_cert", "client_key",
                  "ssh_key_file", "ssh_known_hosts")  # fmt: skip
_LISTS = ("source", "containers", "header", "template", "raw")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
INSTALL_ONLY_KINDS = ("Job", "CronJob")
MAX_INPUT_BYTES = 8 << 20
MAX_NODES = 2_000_000
MAX_DEPTH = 100
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
    health_port: int = HEALTH_PORT
    secret: str | None = None
    config_map: str | None = None
    secret_source: bool = False
    passed_on: tuple[tuple[str, str], ...] = ()
    """Settings passed on to the containers: (name, the value of its ``INFANTRY_*`` variable), in PASSED_ON order."""


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
        "health-port": str(settings.health_port),
        "secret": settings.secret or "",
        "config-map": settings.config_map or "",
        "secret-source": str(settings.secret_source).lower(),
    }
    given_names = settings.model_fields_set
    for name in commands.POD:
        if name in given_names:  # the others are left to the containers' own defaults, which are the same
            values[name.replace("_", "-")] = _setting_text(name, getattr(settings, name))
    if not only_set:
        values["signal"] = ""  # HUP is the default only once a process is named
        return {key: value for key, value in values.items() if value}
    given = {name.replace("_", "-") for name in settings.model_fields_set}
    return {key: value for key, value in values.items() if key in given and value}


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _setting_text(name: str, value: Any) -> str:
    """A setting's value as its ``INFANTRY_*`` variable holds it."""
    if value is None:
        return ""
    if isinstance(value, Wait):
        return f"{_number(value.min)}:{_number(value.max)}"
    if isinstance(value, ByteSize):
        return str(int(value))
    if name == "file_mode":
        return f"{value:04o}"
    if isinstance(value, float):
        return _number(value)
    if name == "template":
        for template in value:
            if template.mode is not None or template.missing != "error":
                raise SettingsError(
                    f"template: {template.dest}: a template with a mode or a missing rule cannot be passed on "
                    "as SRC:DEST; put it in the config file (see config-map)"
                )
        return " ".join(f"{template.src}:{template.dest}" for template in value)
    if name == "raw":
        return " ".join(value)
    if isinstance(value, list):
        return "\n".join(str(item) for item in value)
    return str(value)


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

    for key, value in values.items():
        if len(value) > MAX_VALUE_CHARS:
            raise bad(key, f"the value is longer than {MAX_VALUE_CHARS} characters")
        one_line = value.replace("\n", " ") if key in _LISTS else value
        if not one_line.isprintable():
            raise bad(key, "the value holds a line break or another control character")
    config_map = values.get("config-map") or None
    secret = values.get("secret") or None
    for key, name, kind in (("secret", secret, "Secret"), ("config-map", config_map, "ConfigMap")):
        if name is not None and (len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name)):
            raise bad(
                key, f"expected the name of a {kind} (lower-case letters, digits, '-' and '.'), got {name[:80]!r}"
            )
    sources = tuple(values.get("source", "").replace(",", " ").split())
    if not sources and config_map is None:
        raise bad("source", "at least one source URL is required (or a config file, with infantry.dev/config-map)")
    for url in sources:
        if _scheme(url) not in SCHEMES:
            raise bad("source", f"unsupported source URL {_shown_url(url)} (supported schemes: {', '.join(SCHEMES)})")
    reload_url = values.get("reload-url") or None
    if reload_url is not None and _scheme(reload_url) not in ("http", "https"):
        raise bad("reload-url", f"expected an http:// or https:// URL, got {_shown_url(reload_url)}")
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
    port = values.get("health-port", str(HEALTH_PORT))
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise bad("health-port", f"expected a port from 1 to 65535, or 0 for none, got {port[:20]!r}")
    for key, path in (("secret", SECRET_PATH), ("config-map", CONFIG_DIR)):
        here = mount_path.rstrip("/")
        if values.get(key) and (here == path or path.startswith(here + "/") or here.startswith(path + "/")):
            raise bad("mount-path", f"{here} overlaps {path}, where infantry.dev/{key} is mounted")
    passed_on = []
    for name in PASSED_ON:
        value = values.get(name.replace("_", "-"), "")
        if not value:
            continue
        if name in _FILE_SETTINGS and not value.startswith("/"):
            raise bad(
                name.replace("_", "-"),
                f"expected an absolute path in infantry's container, like {SECRET_PATH}/token, got {value[:80]!r}",
            )
        passed_on.append((name, " ".join(value.split()) if name in ("template", "raw") else value))
    options = InjectOptions(
        sources=sources,
        image=image,
        mount_path=mount_path.rstrip("/"),
        containers=tuple(n for n in values.get("containers", "").replace(",", " ").split() if n),
        signal=(values.get("signal") or "HUP") if values.get("process") else None,
        process=values.get("process") or None,
        reload_url=reload_url,
        mode="native" if mode == "native" else "classic",
        install_only=install_only_kind or flag("install-only"),
        cpu=values.get("cpu", "10m"),
        memory=values.get("memory", "128Mi"),
        run_as_same_user=flag("run-as-same-user"),
        health_port=int(port),
        secret=secret,
        config_map=config_map,
        secret_source=flag("secret-source"),
        passed_on=tuple(passed_on),
    )
    _check_with_settings(options)
    return options


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme
    except ValueError:  # a malformed host ("http://[::1/") is no scheme infantry can use
        return ""


def _shown_url(url: str) -> str:
    """``url`` quoted for a message, without its password or query string (cut to its scheme when it
    does not parse)."""
    return repr(redact_url(url))


# The setting each variable infantry sets stands for, by its annotation key.
_KEY_OF = {
    "source": "source",
    "dest": "mount-path",
    "signal": "signal",
    "process": "process",
    "reload_url": "reload-url",
    "listen": "health-port",
    **{name: name.replace("_", "-") for name in PASSED_ON},
}


def _check_with_settings(options: InjectOptions) -> None:
    """The injected containers' settings must be ones infantry itself accepts.

    The config file, if any, is in the ConfigMap: it is read when the containers start.
    """
    env = {**_watch_env(options), **_passed_on(options, PASSED_ON)}
    env.pop(env_name("config"), None)
    try:
        Settings(**read_environment(env))
    except ValidationError as exc:
        loc = exc.errors(include_url=False, include_input=False, include_context=False)[0]["loc"]
        text = describe_validation_error(exc, Origins())
        key = _KEY_OF.get(str(loc[0])) if loc else None
        if key is not None:
            text = text.removeprefix(f"{str(loc[0]).replace('_', '-')}: ")
        if key is None:  # a rule across settings ("client-cert and client-key go together"): the first named
            named = [(text.find(k), k) for k in _KEY_OF.values() if k in text]
            key = min(named)[1] if named else "source"
            text = text.removeprefix("settings: ")
    except SettingsError as exc:  # a variable the environment reader could not decode
        text = str(exc)
        key = next((k for name, k in _KEY_OF.items() if env_name(name) in text), "source")
    else:
        return
    # The settings quote what they refuse; a URL's password or query string must not travel on.
    for url in [*options.sources, *([options.reload_url] if options.reload_url else [])]:
        text = text.replace(url, _shown_url(url)[1:-1]).replace(repr(url)[1:-1], _shown_url(url)[1:-1])
    raise InvalidAnnotation(PREFIX + key, text) from None


def _passed_on(options: InjectOptions, command: tuple[str, ...]) -> dict[str, str]:
    env = {env_name("config"): CONFIG_FILE} if options.config_map else {}
    env.update((env_name(name), value) for name, value in options.passed_on if name in command)
    return env


def _install_env(options: InjectOptions) -> dict[str, str]:
    env = {env_name("source"): " ".join(options.sources)} if options.sources else {}
    env[env_name("dest")] = options.mount_path
    return env


def _watch_env(options: InjectOptions) -> dict[str, str]:
    env = _install_env(options)
    if options.health_port:
        env["INFANTRY_LISTEN"] = f"0.0.0.0:{options.health_port}"
    if options.process:
        env["INFANTRY_PROCESS"] = options.process
        env["INFANTRY_SIGNAL"] = options.signal or "HUP"
    if options.reload_url:
        env["INFANTRY_RELOAD_URL"] = options.reload_url
    return env


def _install_env_all(options: InjectOptions) -> dict[str, str]:
    return {**_install_env(options), **_passed_on(options, commands.INSTALL)}


def _watch_env_all(options: InjectOptions) -> dict[str, str]:
    return {**_watch_env(options), **_passed_on(options, commands.WATCH)}


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
        "volumeMounts": _own_mounts(options),
        "resources": {
            "requests": {"cpu": options.cpu, "memory": options.memory},
            "limits": {"memory": options.memory},
        },
        "securityContext": copy.deepcopy(context),
    }


def _own_mounts(options: InjectOptions) -> list[Json]:
    mounts: list[Json] = [{"name": VOLUME, "mountPath": options.mount_path}]
    if options.secret:
        mounts.append({"name": SECRET_VOLUME, "mountPath": SECRET_PATH, "readOnly": True})
    if options.config_map:
        mounts.append({"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True})
    return mounts


def _with_probes(container: Json, options: InjectOptions, *, startup: bool) -> Json:
    port = options.health_port
    if port:
        container["ports"] = [{"name": "infantry-health", "containerPort": port}]
        container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 10,
                                      "failureThreshold": 6}  # fmt: skip
        # A sidecar's readiness gates the pod's. It says "a set is live", not /readyz's "in step with
        # the store": a bad change in the store, refused by every pod's check, must not take every pod
        # out of its Services while each serves its last good set.
        container["readinessProbe"] = {"httpGet": {"path": "/configured", "port": port}, "periodSeconds": 10,
                                       "failureThreshold": 3}  # fmt: skip
    if startup:
        check = f"import os, sys; sys.exit(not os.path.exists({options.mount_path + '/..data'!r}))"
        container["startupProbe"] = {"exec": {"command": ["python", "-c", check]}, "periodSeconds": 1,
                                     "failureThreshold": 300}  # fmt: skip
    return container


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "nothing" if value is None else type(value).__name__


def _wrong(field: str, expected: str, value: Any) -> SettingsError:
    return SettingsError(f"{field}: expected {expected}, got {_kind_of(value)}")


def _shown(text: str) -> str:
    """A name from the input, short and on one line, fit for a message."""
    return text if len(text) <= 100 and text.isprintable() else repr(text[:100])


def _check_pod_spec(spec: Any, at: str) -> None:
    """Refuse a pod spec whose fields infantry reads or extends are not shaped as Kubernetes shapes them."""
    if not isinstance(spec, dict):
        raise _wrong(at, "a mapping", spec)
    if not spec.get("containers"):
        raise _wrong(f"{at}.containers", "a list of at least one container", spec.get("containers"))
    for field in ("initContainers", "containers", "volumes"):
        items = spec.get(field)
        if items is None:
            continue
        if not isinstance(items, list):
            raise _wrong(f"{at}.{field}", "a list", items)
        for i, item in enumerate(items):
            here = f"{at}.{field}[{i}]"
            if not isinstance(item, dict):
                raise _wrong(here, "a mapping", item)
            if not isinstance(item.get("name"), str):
                raise _wrong(f"{here}.name", "a string", item.get("name"))
            if field == "volumes":
                continue
            if item.get("securityContext") is not None and not isinstance(item["securityContext"], dict):
                raise _wrong(f"{here}.securityContext", "a mapping", item["securityContext"])
            mounts = item.get("volumeMounts")
            if mounts is not None and not isinstance(mounts, list):
                raise _wrong(f"{here}.volumeMounts", "a list", mounts)
            for j, mount in enumerate(mounts or []):
                if not isinstance(mount, dict):
                    raise _wrong(f"{here}.volumeMounts[{j}]", "a mapping", mount)
                if not isinstance(mount.get("mountPath", ""), str):
                    raise _wrong(f"{here}.volumeMounts[{j}].mountPath", "a string", mount["mountPath"])
    if spec.get("securityContext") is not None and not isinstance(spec["securityContext"], dict):
        raise _wrong(f"{at}.securityContext", "a mapping", spec["securityContext"])


def labels_and_annotations(metadata: Any, at: str) -> tuple[dict[str, str], dict[str, str]]:
    """A pod's labels and annotations as strings; SettingsError naming the field if they are not shaped so."""
    if metadata is None:
        return {}, {}
    if not isinstance(metadata, dict):
        raise _wrong(at, "a mapping", metadata)
    found: list[dict[str, str]] = []
    for field in ("labels", "annotations"):
        value = metadata.get(field)
        if value is not None and not isinstance(value, dict):
            raise _wrong(f"{at}.{field}", "a mapping", value)
        strings: dict[str, str] = {}
        for key, item in (value or {}).items():
            # Checked before str() is taken: a value built from YAML aliases is cheap to hold, not to print.
            if isinstance(item, list | dict):
                raise _wrong(f"{at}.{field}.{_shown(str(key))}", "a string", item)
            strings[str(key)] = str(item)
        found.append(strings)
    return found[0], found[1]


_ARGS = {INSTALL: ["install"], WATCH: ["watch"]}
_MARKER_ENV = ("INFANTRY_DEST", ("INFANTRY_SOURCE", "INFANTRY_CONFIG"))


def _recorded(annotations: Mapping[str, str]) -> dict[str, Any]:
    raw = annotations.get(STATUS, "{}")
    if len(raw) > 4096:  # infantry writes a few hundred bytes; anything longer is not its own
        return {}
    try:
        status = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return status if isinstance(status, dict) else {}


def _names(status: Mapping[str, Any], key: str) -> set[str]:
    value = status.get(key)
    return {name for name in value if isinstance(name, str)} if isinstance(value, list) else set()


def _repository(image: Any) -> str | None:
    """The image's repository, without tag or digest: ``registry:5000/infantry:1`` is ``registry:5000/infantry``."""
    if not isinstance(image, str) or not image:
        return None
    name = image.partition("@")[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name


def _is_injected(container: Json, repository: str | None) -> bool:
    """True if ``container`` is what infantry injects: its name, its args, its image family, its marks."""
    env = container.get("env")
    env_names = {e.get("name") for e in env if isinstance(e, dict)} if isinstance(env, list) else set()
    mounts = container.get("volumeMounts") or []
    return (
        container.get("args") == _ARGS.get(container["name"])
        and repository is not None
        and _repository(container.get("image")) == repository
        and _MARKER_ENV[0] in env_names
        and any(name in env_names for name in _MARKER_ENV[1])
        and any(m.get("name") == VOLUME for m in mounts)
    )


def _remove_injected(spec: Json, annotations: Mapping[str, str]) -> Json:
    """A copy of a checked ``spec`` without what infantry injected earlier.

    The status annotation is only a hint, and anyone can write one: a container is taken out only if it
    is exactly what infantry injects (see ``_is_injected``), and the volume, the mounts and
    ``shareProcessNamespace`` only along with such a container. An app's own objects always stay.
    """
    spec = copy.deepcopy(spec)
    status = _recorded(annotations)
    repository = _repository(status.get("image"))
    removed: set[str] = set()
    for field in ("initContainers", "containers"):
        listed = _names(status, field) & set(_ARGS)
        if listed and spec.get(field):
            kept = []
            for container in spec[field]:
                if container["name"] in listed and _is_injected(container, repository):
                    removed.add(container["name"])
                else:
                    kept.append(container)
            spec[field] = kept
    if not removed:
        return spec
    volumes = spec.get("volumes") or []
    listed = _names(status, "volumes")
    ours = [v["name"] in listed and _is_own_volume(v) for v in volumes]
    if any(ours):
        spec["volumes"] = [v for v, is_ours in zip(volumes, ours, strict=True) if not is_ours]
    if any(is_ours and v["name"] == VOLUME for v, is_ours in zip(volumes, ours, strict=True)):
        mounted = _names(status, "mounts")
        for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
            if container["name"] in mounted and container.get("volumeMounts"):
                container["volumeMounts"] = [
                    m for m in container["volumeMounts"] if not (m.get("name") == VOLUME and m.get("readOnly") is True)
                ]
    if status.get("shareProcessNamespace") is True and WATCH in removed:
        spec.pop("shareProcessNamespace", None)
    return spec


def _is_own_volume(volume: Json) -> bool:
    """True if ``volume`` is shaped exactly as infantry adds it under its name (its source aside)."""
    shapes = {VOLUME: ("emptyDir", None), SECRET_VOLUME: ("secret", "secretName"), CONFIG_VOLUME: ("configMap", "name")}
    if volume["name"] not in shapes:
        return False
    field, name_field = shapes[volume["name"]]
    if set(volume) != {"name", field}:
        return False
    return name_field is None or (isinstance(volume[field], dict) and set(volume[field]) == {name_field})


def _refuse_clashes(spec: Json, at: str, options: InjectOptions) -> None:
    """What is left of infantry's names belongs to the app: injecting would make a pod with two of them."""
    for field in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(field) or []):
            if container["name"] in _ARGS:
                raise SettingsError(
                    f"{at}.{field}[{i}]: the pod already has a container named {container['name']}, a name "
                    "infantry adds; rename it"
                )
    added = _added_volumes(options)
    for i, volume in enumerate(spec.get("volumes") or []):
        if volume["name"] in added:
            raise SettingsError(
                f"{at}.volumes[{i}]: the pod already has a volume named {volume['name']}, a name infantry adds; "
                "rename it"
            )
    for field in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(field) or []):
            ports = container.get("ports")
            for port in ports if isinstance(ports, list) else []:
                if options.health_port and isinstance(port, dict) and port.get("containerPort") == options.health_port:
                    raise InvalidAnnotation(
                        PREFIX + "health-port",
                        f"{at}.{field}[{i}] already uses port {options.health_port}; choose another for infantry",
                    )


def _added_volumes(options: InjectOptions) -> dict[str, Json]:
    """The volumes infantry adds, by name."""
    volumes: dict[str, Json] = {
        VOLUME: {"name": VOLUME, "emptyDir": {"medium": "Memory"} if options.secret_source else {}}
    }
    if options.secret:
        volumes[SECRET_VOLUME] = {"name": SECRET_VOLUME, "secret": {"secretName": options.secret}}
    if options.config_map:
        volumes[CONFIG_VOLUME] = {"name": CONFIG_VOLUME, "configMap": {"name": options.config_map}}
    return volumes


def inject_pod(
    spec: Any, annotations: Mapping[str, str], options: InjectOptions, *, at: str = "spec"
) -> tuple[Json, dict[str, str]]:
    """The pod spec and annotations with infantry added (after taking out any earlier injection).

    ``at`` is where the spec sits in its document; a wrongly shaped spec, or one that already uses a name
    infantry adds, raises SettingsError naming the field from there.
    """
    _check_pod_spec(spec, at)
    spec = _remove_injected(spec, annotations)
    for field in ("initContainers", "volumes"):
        if field in spec and spec[field] is None:
            del spec[field]
    _refuse_clashes(spec, at, options)
    annotations = dict(annotations)
    apps = spec["containers"]
    names = [c["name"] for c in apps]
    unknown = [n for n in options.containers if n not in names]
    if unknown:
        raise InvalidAnnotation(PREFIX + "containers", f"no container named {', '.join(unknown)} in this pod")
    targets = [c for c in apps if not options.containers or c["name"] in options.containers]
    for container in targets:
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath", "").rstrip("/") == options.mount_path:
                raise InvalidAnnotation(
                    PREFIX + "mount-path",
                    f"container {container['name']} already mounts something at {options.mount_path}",
                )
        if container.get("volumeMounts") is None:
            container["volumeMounts"] = []
        container["volumeMounts"].append({"name": VOLUME, "mountPath": options.mount_path, "readOnly": True})
    added = _added_volumes(options)
    spec.setdefault("volumes", []).extend(added.values())
    context = _security_context(options, spec, targets)
    init = spec.setdefault("initContainers", [])
    injected_init: list[str] = []
    injected: list[str] = []
    if options.install_only:
        init.insert(0, _container(INSTALL, ["install"], _install_env_all(options), options, context))
        injected_init.append(INSTALL)
    elif options.mode == "native":
        watch = _container(WATCH, ["watch"], _watch_env_all(options), options, context)
        watch["restartPolicy"] = "Always"
        init.insert(0, _with_probes(watch, options, startup=True))
        injected_init.append(WATCH)
    else:
        init.insert(0, _container(INSTALL, ["install"], _install_env_all(options), options, context))
        injected_init.append(INSTALL)
        # Appended last, so `kubectl logs` and `kubectl exec` still default to the app.
        apps.append(_with_probes(_container(WATCH, ["watch"], _watch_env_all(options), options, context), options,
                                 startup=False))  # fmt: skip
        injected.append(WATCH)
    set_share = bool(options.process) and not options.install_only and "shareProcessNamespace" not in spec
    if set_share:
        spec["shareProcessNamespace"] = True
    status = {
        "image": options.image,
        "mode": "install-only" if options.install_only else options.mode,
        "initContainers": injected_init,
        "containers": injected,
        "volumes": list(added),
        "mounts": [c["name"] for c in targets],
        "shareProcessNamespace": set_share,
    }
    annotations[STATUS] = json.dumps(status, sort_keys=True, separators=(",", ":"))
    return spec, annotations


def pod_warnings(spec: Json, options: InjectOptions) -> list[str]:
    """What, in a pod infantry was injected into, keeps it from doing what it was asked: short lines."""
    found: list[str] = []
    if options.mode == "native" and not options.install_only:  # (a Job's install never uses watch's settings)
        unused = [PREFIX + name.replace("_", "-") for name, _ in options.passed_on if name not in commands.WATCH]
        if unused:
            found.append(f"{', '.join(unused)}: for install only, and a native sidecar has no install container")
    if not options.process or options.install_only:
        return found
    process = _shown(options.process)
    if spec.get("shareProcessNamespace") is False:
        found.append(f"shareProcessNamespace is false: infantry cannot see process {process} to signal it")
    if options.run_as_same_user:
        return found
    pod_context = spec.get("securityContext") or {}
    pod_uid = pod_context.get("runAsUser")
    for container in spec["containers"]:
        name = container["name"]
        if name in _ARGS or (options.containers and name not in options.containers):
            continue
        uid = (container.get("securityContext") or {}).get("runAsUser", pod_uid)
        if not isinstance(uid, int) or isinstance(uid, bool) or uid == pod_uid != 0:
            continue
        if uid == 0:
            found.append(f"container {_shown(name)} runs as root: infantry, not root, cannot signal {process} in it")
        else:
            found.append(
                f"container {_shown(name)} runs as UID {uid}, infantry as another: set {PREFIX}run-as-same-user "
                f"to signal {process}"
            )
    return found


Warn = Callable[[str], None]


def pod_template(doc: Json) -> tuple[Json, str] | None:
    """The mapping holding the pod's metadata and spec in a workload, and its path ("" or "spec.template.").

    None for kinds that make no pods; a workload whose path to its pod is not made of mappings raises
    SettingsError naming the field.
    """
    kind = doc.get("kind")
    if kind == "Pod":
        path: tuple[str, ...] = ()
    elif kind in POD_TEMPLATE_KINDS:
        path = ("spec", "template")
    elif kind == "CronJob":
        path = ("spec", "jobTemplate", "spec", "template")
    else:
        return None
    holder, at = doc, ""
    for key in path:
        value = holder.get(key)
        if not isinstance(value, dict):
            raise _wrong(at + key, "a mapping", value)
        holder, at = value, f"{at}{key}."
    if not isinstance(holder.get("spec"), dict):
        raise _wrong(at + "spec", "a mapping", holder.get("spec"))
    return holder, at


def _describe(doc: Json) -> str:
    kind, metadata = doc.get("kind"), doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{_shown(kind) if isinstance(kind, str) else '?'}/{_shown(name) if isinstance(name, str) else '?'}"


def inject_document(doc: Any, settings: Settings, *, annotate_only: bool, warn: Warn, where: str) -> Any:
    """One YAML document with infantry injected into each workload it holds; other kinds pass through.

    A workload that cannot be injected (a bad annotation, a wrongly shaped field, a name infantry adds
    already taken) raises SettingsError naming ``where``, the workload and the field.
    """
    if not isinstance(doc, dict):
        return doc
    doc = copy.deepcopy(doc)
    name = _describe(doc)
    if doc.get("kind") == "List":
        items = doc.get("items")
        if items is not None and not isinstance(items, list):
            raise SettingsError(f"{_wrong('items', 'a list', items)} (in {where}, {name})")
        doc["items"] = [
            inject_document(item, settings, annotate_only=annotate_only, warn=warn, where=f"{where} item {i}")
            for i, item in enumerate(items or [])
        ]
        return doc
    try:
        return _inject_workload(doc, settings, annotate_only=annotate_only, warn=warn, where=f"{where} ({name})")
    except InvalidAnnotation as exc:
        raise InvalidAnnotation(exc.annotation, f"{exc.detail} (in {where}, {name})") from None
    except SettingsError as exc:
        raise SettingsError(f"{exc} (in {where}, {name})") from None


def _inject_workload(doc: Json, settings: Settings, *, annotate_only: bool, warn: Warn, where: str) -> Json:
    if doc.get("metadata") is not None and not isinstance(doc["metadata"], dict):
        raise _wrong("metadata", "a mapping", doc["metadata"])
    found = pod_template(doc)
    if found is None:
        warn(f"{where}: not a workload; passed through unchanged")
        return doc
    holder, at = found
    labels, annotations = labels_and_annotations(holder.get("metadata"), at + "metadata")
    overrides = option_values(settings, only_set=True)
    said = opted_in(labels, annotations)
    if said is False:
        warn(f'{where}: {INJECT} is "false"; left alone')
        return doc
    if said is None and "source" not in overrides:
        warn(f"{where}: not opted in and no --source given; left alone")
        return doc
    if holder.get("metadata") is None:
        holder["metadata"] = {}
    metadata = holder["metadata"]
    if annotate_only:
        metadata["labels"] = {**(metadata.get("labels") or {}), INJECT: "true"}
        metadata["annotations"] = {**annotations, **{PREFIX + k: v for k, v in overrides.items()}}
        return doc
    values = {**option_values(settings, only_set=False), **annotation_values(annotations), **overrides}
    options = parse_options(values, install_only_kind=doc.get("kind") in INSTALL_ONLY_KINDS)
    holder["spec"], metadata["annotations"] = inject_pod(holder["spec"], annotations, options, at=at + "spec")
    for warning in pod_warnings(holder["spec"], options):
        warn(f"{where}: {warning}")
    return doc


class _Refused(Exception):
    """Input that is valid YAML but would cost more than any manifest can need."""

    def __init__(self, reason: str, event: yaml.Event) -> None:
        mark = event.start_mark
        super().__init__(f"{reason} (line {mark.line + 1})" if mark is not None else reason)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with every node counted as often as aliases would repeat it, and nesting capped.

    An alias costs what it stands for once expanded (as a client that turns the YAML into JSON would
    expand it), so a "billion laughs" document, merge keys included, is refused after a few hundred
    events, and no later step (copying, dumping, a recursive walk) meets a structure deeper than
    MAX_DEPTH.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._spent = 0
        self._depth = 0
        self._open: set[str] = set()
        self._sizes: dict[yaml.Node, tuple[int, int]] = {}

    def compose_document(self) -> yaml.Node | None:
        self._sizes.clear()
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if event.anchor in self._open:
                raise _Refused(f"the alias *{event.anchor} refers to a node that holds it", event)
            if node is not None:
                count, height = self._expanded(node)
                self._spend(count, self._depth + height, event)
            return super().compose_node(parent, index)
        self._spend(1, self._depth + 1, event)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor or "")

    def _spend(self, count: int, depth: int, event: yaml.Event) -> None:
        self._spent += count
        if self._spent > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} nodes once aliases are expanded", event)
        if depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event)

    def _expanded(self, node: yaml.Node) -> tuple[int, int]:
        """How many nodes ``node`` stands for once expanded, and how deep it goes (a completed node)."""
        if node not in self._sizes:
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            sizes = [self._expanded(child) for child in children]
            self._sizes[node] = (1 + sum(s[0] for s in sizes), 1 + max((s[1] for s in sizes), default=0))
        return self._sizes[node]


def load_documents(text: str) -> list[Any]:
    """Every YAML document in ``text``, safely loaded, with aliases bounded and nesting capped."""
    if len(text) > MAX_INPUT_BYTES:
        raise SettingsError(f"file: the input is over {MAX_INPUT_BYTES >> 20} MiB, more than any manifest needs")
    documents: list[Any] = []
    try:
        for document in yaml.load_all(text, Loader=_BoundedLoader):
            documents.append(document)
    except _Refused as exc:
        raise SettingsError(f"file: document {len(documents) + 1} is refused: {exc}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise SettingsError(f"file: document {len(documents) + 1} is not valid YAML: {detail}") from None
    return documents


def read_documents(path: str, stdin: TextIO) -> list[Any]:
    """The YAML documents in the file at ``path``, or in ``stdin`` for "-", read no further than the size cap."""
    try:
        if path == "-":
            text = stdin.read(MAX_INPUT_BYTES + 1)
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise SettingsError(f"file: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise SettingsError(f"file: {path} is not UTF-8 text (byte {exc.start})") from None
    return load_documents(text)
