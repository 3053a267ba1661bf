"""`infantry webhook` as a real HTTPS server on loopback, with certificates made in the test."""

from __future__ import annotations

import base64
import copy
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import free_port, port_open, wait_until

SOURCE = "etcd://etcd.config.svc:2379/app/"


class Webhook:
    """The webhook process, its certificate files, and a client that trusts them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cert, self.key = workdir / "tls.crt", workdir / "tls.key"
        self.ca = self.issue()
        self.port = free_port()
        self.log = (workdir / "webhook.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infantry", "webhook", "--listen", f"127.0.0.1:{self.port}",
             "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key), "--image", "infantry:test"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until("the webhook to listen", lambda: port_open(self.port) or self.proc.poll() is not None, timeout=30)
        assert self.proc.poll() is None, f"the webhook exited {self.proc.returncode}"

    def issue(self) -> trustme.CA:
        """Write a fresh certificate for 127.0.0.1 from a new CA; return the CA."""
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        tmp_cert, tmp_key = self.cert.with_name("tls.crt.new"), self.key.with_name("tls.key.new")
        leaf.cert_chain_pems[0].write_to_path(str(tmp_cert))
        leaf.private_key_pem.write_to_path(str(tmp_key))
        tmp_key.rename(self.key)
        tmp_cert.rename(self.cert)
        return ca

    def client(self, ca: trustme.CA | None = None) -> httpx.Client:
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        return httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=context, timeout=10)

    def mutate(self, review: dict[str, Any] | bytes, client: httpx.Client | None = None) -> httpx.Response:
        body = review if isinstance(review, bytes) else json.dumps(review).encode()
        with self.client() if client is None else _keep(client) as c:
            return c.post("/mutate", content=body, headers={"Content-Type": "application/json"})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=20)
        self.log.close()
        return code


class _keep:  # noqa: N801 (a context manager that leaves a shared client open)
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __enter__(self) -> httpx.Client:
        return self.client

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Webhook]:
    server = Webhook(tmp_path)
    yield server
    server.stop()


def pod(annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "web-7d9f-"}  # no name and no namespace, as at admission
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"containers": [{"name": "web", "image": "nginxinc/nginx-unprivileged:1.27-alpine"}]}}  # fmt: skip


def admission(obj: dict[str, Any], operation: str = "CREATE", kind: str = "Pod", uid: str = "c0ffee") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": kind.lower() + "s"},
            "namespace": "shop",
            "operation": operation,
            "object": obj,
        },
    }


def apply(review_response: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    response = review_response["response"]
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return dict(jsonpatch.apply_patch(obj, patch))


def test_opted_in_pod_gets_a_patch_that_validates_and_a_second_review_gets_none(webhook: Webhook) -> None:
    original = pod(labels={"infantry.dev/inject": "true"},
                   annotations={"infantry.dev/source": SOURCE, "infantry.dev/process": "nginx"})  # fmt: skip
    resp = webhook.mutate(admission(original, uid="uid-1"))
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "uid-1" and answer["response"]["allowed"] is True
    mutated = apply(answer, copy.deepcopy(original))
    for version in ("1.29.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(
            {**mutated, "metadata": {**mutated["metadata"], "name": "web"}}, version, strict=True
        )
    names = [c["name"] for c in mutated["spec"]["containers"]]
    assert names == ["web", "infantry-watch"]
    assert mutated["spec"]["shareProcessNamespace"] is True
    assert mutated["spec"]["containers"][1]["image"] == "infantry:test"
    assert "infantry.dev/status" in mutated["metadata"]["annotations"]  # a '/' in the key, escaped as ~1

    again = webhook.mutate(admission(mutated, uid="uid-2")).json()
    assert again["response"] == {"uid": "uid-2", "allowed": True}


def test_pods_not_opted_in_and_other_requests_pass_untouched(webhook: Webhook) -> None:
    with webhook.client() as client:
        for review in (
            admission(pod()),
            admission(
                pod(
                    annotations={"infantry.dev/inject": "false", "infantry.dev/source": SOURCE},
                    labels={"infantry.dev/inject": "true"},
                )
            ),
            admission(
                pod(labels={"infantry.dev/inject": "true"}, annotations={"infantry.dev/source": SOURCE}),
                operation="UPDATE",
            ),
            admission({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, kind="ConfigMap"),
        ):
            answer = webhook.mutate(review, client).json()
            assert answer["response"] == {"uid": "c0ffee", "allowed": True}


def test_an_invalid_annotation_is_denied_naming_it(webhook: Webhook) -> None:
    review = admission(pod(annotations={"infantry.dev/inject": "true", "infantry.dev/source": SOURCE,
                                        "infantry.dev/mode": "sideways"}))  # fmt: skip
    response = webhook.mutate(review).json()["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "infantry.dev/mode" in response["status"]["message"]


def test_the_native_mode_annotation(webhook: Webhook) -> None:
    original = pod(annotations={"infantry.dev/inject": "true", "infantry.dev/source": SOURCE,
                                "infantry.dev/mode": "native"})  # fmt: skip
    mutated = apply(webhook.mutate(admission(original)).json(), copy.deepcopy(original))
    init = mutated["spec"]["initContainers"]
    assert init[0]["name"] == "infantry-watch" and init[0]["restartPolicy"] == "Always"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2, 3]", 400, "not an AdmissionReview"),
        (
            json.dumps({**admission(pod()), "apiVersion": "admission.k8s.io/v1beta1"}).encode(),
            400,
            "only admission.k8s.io/v1",
        ),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), 400, "uid"),
        (b"x" * (2 << 20), 413, "over"),
    ],
)
def test_bad_bodies_get_a_well_formed_error(webhook: Webhook, body: bytes, status: int, error: str) -> None:
    resp = webhook.mutate(body)
    assert resp.status_code == status
    assert error in resp.json()["error"]
    with webhook.client() as client:
        assert client.get("/healthz").status_code == 200


def test_certificate_rotation_is_picked_up_by_new_connections(webhook: Webhook) -> None:
    with webhook.client() as client:
        assert client.get("/healthz").status_code == 200
    new_ca = webhook.issue()
    with webhook.client(new_ca) as client:
        assert client.get("/healthz").status_code == 200
    with webhook.client() as old, pytest.raises(httpx.ConnectError):
        old.get("/healthz")


def test_a_slow_client_does_not_block_others_and_sigterm_is_graceful(webhook: Webhook) -> None:
    raw = socket.create_connection(("127.0.0.1", webhook.port))
    context = ssl.create_default_context()
    webhook.ca.configure_trust(context)
    slow = context.wrap_socket(raw, server_hostname="127.0.0.1")
    slow.sendall(b'POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"partial":')
    results: list[int] = []

    def call() -> None:
        with webhook.client() as client:
            results.append(client.get("/healthz").status_code)

    threads = [threading.Thread(target=call) for _ in range(20)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert results == [200] * 20
    # Under the clients' 10 s timeout: none of them waited for the slow one.
    assert time.monotonic() - started < 9
    slow.close()
    assert webhook.stop() == 0


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
        max_leaves=20,
    )
)
def test_random_json_never_crashes_or_hangs_it(webhook: Webhook, body: Any) -> None:
    if isinstance(body, dict) and body:
        body = {**admission(pod(labels={"infantry.dev/inject": "true"})), **body}
    resp = webhook.mutate(json.dumps(body).encode())
    assert resp.status_code in (200, 400)
    answer = resp.json()
    assert isinstance(answer, dict) and ("error" in answer or "response" in answer)
    assert webhook.proc.poll() is None


def process_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count in /proc")


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed or reset ``sock`` (checked without blocking)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:  # reset, or TLS ended without close_notify
        return True


class Trickler:
    """Clients that send a request one byte at a time, every half second, as a slowloris does."""

    HEAD = b"POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    def __init__(self, socks: list[ssl.SSLSocket]) -> None:
        self.socks = socks
        self.closed: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sent = 0
        while not self.stop.wait(0.5) and sent < len(self.HEAD) - 1:
            for i, sock in enumerate(self.socks):
                if i not in self.closed:
                    try:
                        sock.sendall(self.HEAD[sent : sent + 1])
                    except OSError:
                        self.closed.add(i)
            sent += 1

    def all_closed(self) -> bool:
        return len(self.closed) == len(self.socks)


def test_idle_slow_and_silent_clients_are_bounded_and_dropped_while_others_are_answered(webhook: Webhook) -> None:
    from infantry.webhook import MAX_CONNECTIONS, READ_TIMEOUT_SECONDS

    context = ssl.create_default_context()
    webhook.ca.configure_trust(context)

    def tls() -> ssl.SSLSocket:
        return context.wrap_socket(socket.create_connection(("127.0.0.1", webhook.port)), server_hostname="127.0.0.1")

    def tcp(first_bytes: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", webhook.port))
        sock.sendall(first_bytes)
        return sock

    # Under the cap: each must be dropped for its own slowness, at the read deadline.
    opened = time.monotonic()
    idle_tls = [tls() for _ in range(40)]
    trickler = Trickler([tls() for _ in range(20)])
    silent = [tcp(b"") for _ in range(40)]
    half_hello = [tcp(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") for _ in range(20)]
    held = [*idle_tls, *silent, *half_hello]
    assert len(held) + len(trickler.socks) < MAX_CONNECTIONS

    review = admission(pod(labels={"infantry.dev/inject": "true"}, annotations={"infantry.dev/source": SOURCE}))
    started = time.monotonic()
    resp = webhook.mutate(review)
    assert resp.status_code == 200 and resp.json()["response"]["allowed"] is True
    assert time.monotonic() - started < 5, "a good review waited behind the slow clients"
    assert process_threads(webhook.proc.pid) <= 16

    wait_until(
        "every idle, silent and slow client to be dropped",
        lambda: all(closed_by_server(s) for s in held) and trickler.all_closed(),
        timeout=READ_TIMEOUT_SECONDS + 20,
    )
    # Not before the deadline: the trickling ones kept sending all along.
    assert time.monotonic() - opened > READ_TIMEOUT_SECONDS - 1
    trickler.stop.set()

    # Over the cap: the server holds no more than the cap, and a good client still gets in.
    flood = [tcp(b"") for _ in range(MAX_CONNECTIONS + 100)]
    with webhook.client() as client:
        started = time.monotonic()
        assert client.post("/mutate", json=review).status_code == 200
        assert time.monotonic() - started < 5
    assert len(list(Path(f"/proc/{webhook.proc.pid}/fd").iterdir())) <= MAX_CONNECTIONS + 32
    assert process_threads(webhook.proc.pid) <= 16
    for sock in [*held, *trickler.socks, *flood]:
        sock.close()


def deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return value


def review_of(spec: Any = None, metadata: Any = None) -> bytes:
    obj = pod(labels={"infantry.dev/inject": "true"}, annotations={"infantry.dev/source": SOURCE})
    if spec is not None:
        obj["spec"] = spec
    if metadata is not None:
        obj["metadata"] = metadata
    return json.dumps(admission(obj)).encode()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested"),
        (review_of({"containers": [{"name": "web", "image": "x", "env": [deep(200)]}]}), "nested"),
        (review_of({"containers": "web"}), "spec.containers"),
        (review_of({"containers": ["web"]}), "spec.containers[0]"),
        (review_of({"containers": [{"name": "web", "volumeMounts": {"name": "x"}}]}), "volumeMounts"),
        (review_of([{"name": "web"}]), "spec: expected a mapping"),
        (review_of(metadata={"labels": {"infantry.dev/inject": "true"}, "annotations": ["x"]}), "annotations"),
        (review_of(metadata={"labels": ["infantry.dev/inject"]}), "metadata.labels"),
        (json.dumps(admission(pod())).replace('"c0ffee"', "NaN").encode(), "not JSON"),
    ],
    ids=["deep-json", "deep-pod", "containers-a-string", "container-a-string", "mounts-a-mapping", "spec-a-list",
         "annotations-a-list", "labels-a-list", "nan"],
)  # fmt: skip
def test_a_malformed_review_gets_a_400_or_a_denial_never_a_500(webhook: Webhook, body: bytes, named: str) -> None:
    resp = webhook.mutate(body)
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert named in resp.json()["error"]
    else:
        response = resp.json()["response"]
        assert response["allowed"] is False and response["status"]["code"] == 400
        assert named in response["status"]["message"]
    with webhook.client() as client:
        assert client.get("/healthz").status_code == 200
    assert webhook.proc.poll() is None


def test_names_infantry_adds_are_denied_and_a_forged_status_removes_nothing(webhook: Webhook) -> None:
    opted = {"labels": {"infantry.dev/inject": "true"}, "annotations": {"infantry.dev/source": SOURCE}}
    web = {"name": "web", "image": "nginxinc/nginx-unprivileged:1.27-alpine"}
    clashes = {
        "spec.containers[1]": {"containers": [web, {"name": "infantry-watch", "image": "example/metrics:1"}]},
        "spec.volumes[0]": {"containers": [web], "volumes": [{"name": "infantry-configs", "emptyDir": {}}]},
    }
    for field, spec in clashes.items():
        response = webhook.mutate(review_of(spec, {"generateName": "web-", **opted})).json()["response"]
        assert response["allowed"] is False, f"{field}: a pod with two of a name would be made"
        assert field in response["status"]["message"] and "infantry-" in response["status"]["message"]

    forged = json.dumps({"image": web["image"], "containers": ["web"], "volumes": ["data"], "mounts": ["web"]})
    spec = {"containers": [{**web, "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]}  # fmt: skip
    metadata = {"generateName": "web-", "labels": opted["labels"],
                "annotations": {**opted["annotations"], "infantry.dev/status": forged}}  # fmt: skip
    original = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    answer = webhook.mutate(admission(original)).json()
    mutated = apply(answer, copy.deepcopy(original))
    assert [c["name"] for c in mutated["spec"]["containers"]] == ["web", "infantry-watch"]
    assert [v["name"] for v in mutated["spec"]["volumes"]] == ["data", "infantry-configs"]
    assert {"name": "data", "mountPath": "/data"} in mutated["spec"]["containers"][0]["volumeMounts"]


def test_rejected_urls_are_redacted_in_the_denial_and_the_log(webhook: Webhook) -> None:
    secret = "R3loadPass"
    for annotation, url in {
        "infantry.dev/source": f"ftp://deploy:{secret}@store.example/app?token={secret}",
        "infantry.dev/reload-url": f"ftp://admin:{secret}@127.0.0.1:8080/-/reload",
    }.items():
        annotations = {"infantry.dev/inject": "true", "infantry.dev/source": SOURCE, annotation: url}
        resp = webhook.mutate(admission(pod(annotations=annotations)))
        response = resp.json()["response"]
        assert response["allowed"] is False and annotation in response["status"]["message"]
        assert secret not in resp.text
    assert webhook.stop() == 0
    log = (webhook.workdir / "webhook.log").read_text()
    assert log.count("denied pod") == 2
    assert secret not in log


def strictly_valid(pod_object: dict[str, Any]) -> None:
    named = {**pod_object, "metadata": {**pod_object["metadata"], "name": "web"}}
    for version in ("1.29.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(named, version, strict=True)


@pytest.mark.parametrize("mode", ["classic", "native"])
def test_the_secret_config_map_and_settings_annotations_and_their_warnings(webhook: Webhook, mode: str) -> None:
    annotations = {
        "infantry.dev/inject": "true", "infantry.dev/source": SOURCE, "infantry.dev/mode": mode,
        "infantry.dev/process": "nginx", "infantry.dev/secret": "store-auth", "infantry.dev/config-map": "web-infantry",
        "infantry.dev/secret-source": "true", "infantry.dev/health-port": "9100", "infantry.dev/interval": "30",
        "infantry.dev/ca-file": "/var/run/secrets/infantry/ca.crt", "infantry.dev/log-level": "debug",
    }  # fmt: skip
    original = pod(annotations=annotations)
    original["spec"]["shareProcessNamespace"] = False
    original["spec"]["securityContext"] = {"runAsUser": 0}
    answer = webhook.mutate(admission(original)).json()
    response = answer["response"]
    assert response["allowed"] is True
    warnings = response["warnings"]
    assert any("shareProcessNamespace is false" in w for w in warnings)
    assert any("container web runs as root" in w for w in warnings)
    assert all(w.startswith("infantry: ") and len(w) <= 256 and w.isprintable() for w in warnings)
    mutated = apply(answer, copy.deepcopy(original))
    strictly_valid(mutated)
    spec = mutated["spec"]
    assert {"name": "infantry-secret", "secret": {"secretName": "store-auth"}} in spec["volumes"]
    assert {"name": "infantry-config", "configMap": {"name": "web-infantry"}} in spec["volumes"]
    assert {"name": "infantry-configs", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    watch = next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == "infantry-watch")
    env = {e["name"]: e["value"] for e in watch["env"]}
    assert env["INFANTRY_INTERVAL"] == "30" and env["INFANTRY_LISTEN"] == "0.0.0.0:9100"
    assert env["INFANTRY_CONFIG"] == "/etc/infantry/infantry.yaml" and env["INFANTRY_LOG_LEVEL"] == "debug"
    assert watch["readinessProbe"]["httpGet"] == {"path": "/configured", "port": 9100}
    # Reviewed again, the injected pod needs no patch; the warnings still hold.
    again = webhook.mutate(admission(mutated, uid="uid-2")).json()["response"]
    assert "patch" not in again and again["allowed"] is True and again["warnings"] == warnings


def test_a_pod_without_problems_gets_no_warnings(webhook: Webhook) -> None:
    original = pod(annotations={"infantry.dev/inject": "true", "infantry.dev/source": SOURCE,
                                "infantry.dev/process": "nginx"})  # fmt: skip
    response = webhook.mutate(admission(original)).json()["response"]
    assert response["allowed"] is True and "patch" in response and "warnings" not in response


def test_the_webhooks_settings_are_the_defaults_beneath_the_annotations() -> None:
    from infantry.settings import load_settings
    from infantry.webhook import review

    settings = load_settings({"image": "infantry:test", "interval": 20.0, "wait": "1:5", "secret": "shared-auth",
                              "bearer_token_file": "/var/run/secrets/infantry/token"}, {})  # fmt: skip
    annotations = {"infantry.dev/inject": "true", "infantry.dev/source": SOURCE, "infantry.dev/interval": "45"}
    original = pod(annotations=annotations)
    answer = review(json.dumps(admission(original)).encode(), settings)
    mutated = apply(answer, copy.deepcopy(original))
    strictly_valid(mutated)
    watch = mutated["spec"]["containers"][-1]
    env = {e["name"]: e["value"] for e in watch["env"]}
    assert env["INFANTRY_INTERVAL"] == "45"  # the annotation wins
    assert env["INFANTRY_WAIT"] == "1:5" and env["INFANTRY_BEARER_TOKEN_FILE"] == "/var/run/secrets/infantry/token"
    assert "INFANTRY_TIMEOUT" not in env and "INFANTRY_LOG_LEVEL" not in env  # not given: the image's defaults
    assert {"name": "infantry-secret", "secret": {"secretName": "shared-auth"}} in mutated["spec"]["volumes"]
    bad = pod(annotations={**annotations, "infantry.dev/wait": "9:1"})
    response = review(json.dumps(admission(bad)).encode(), settings)["response"]
    assert response["allowed"] is False and "infantry.dev/wait" in response["status"]["message"]


def test_file_settings_passed_on_are_not_looked_for_in_the_webhooks_own_container(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "infantry", "webhook", "--listen", f"127.0.0.1:{port}", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--ca-file", "/var/run/secrets/infantry/ca.crt", "--check", "/opt/app/check"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until("the webhook to listen or exit", lambda: port_open(port) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, "the webhook refused to start over its pods' settings"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
