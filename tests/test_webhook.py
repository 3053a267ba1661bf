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
