"""The etcd source against a real etcd: install, watch, transactions, restarts, compaction, auth, TLS, scale."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.support import (
    CuttableProxy,
    Etcd,
    SignalRecorder,
    TlsFiles,
    Watch,
    holds_for,
    infantry,
    port_open,
    read_as_app,
    tree,
    wait_until,
)


def as_files(keys: dict[str, bytes], prefix: str = "/app/") -> dict[str, str]:
    return {k.removeprefix(prefix): v.decode() for k, v in keys.items()}


def watch_then_cut(etcd: Etcd, proxy: CuttableProxy, tmp_path: Path, watches: list[Watch]) -> tuple[Watch, Path]:
    """`watch` on /app/ (holding a=1) through the proxy, ready; then the connection is cut."""
    etcd.put("/app/a", "1")
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path, ["--source", f"etcd://127.0.0.1:{proxy.port}/app/", "--dest", str(dest), "--interval", "0.5"]
    )
    watches.append(watch)
    watch.wait_ready()
    proxy.cut()
    wait_until("the watcher to notice", lambda: watch.metric("infantry_syncs_total", result="error") >= 1, timeout=10)
    return watch, dest


def test_install_writes_every_key_and_binary_values_round_trip(etcd: Etcd, tmp_path: Path) -> None:
    binary = bytes(range(256)) * 4
    etcd.put("/app/app.yaml", "color: blue\n")
    etcd.put("/app/conf.d/extra.conf", "x=1\n")
    etcd.put("/app/blob.bin", binary)
    etcd.put("/other/ignored", "not under the prefix")
    dest = tmp_path / "D"
    result = infantry("install", "--source", etcd.url("/app/"), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert (dest / "blob.bin").read_bytes() == binary
    assert (dest / "app.yaml").read_text() == "color: blue\n"
    assert (dest / "conf.d" / "extra.conf").read_text() == "x=1\n"
    assert sorted(os.listdir(dest / "..data")) == ["app.yaml", "blob.bin", "conf.d"]


def test_watch_puts_deletes_and_one_signal_per_transaction(etcd: Etcd, tmp_path: Path, watches: list[Watch]) -> None:
    etcd.put("/app/a.yaml", "v: 1\n")
    dest = tmp_path / "D"
    assert infantry("install", "--source", etcd.url(), "--dest", str(dest)).returncode == 0
    app = SignalRecorder(tmp_path, config=dest / "a.yaml")
    try:
        watch = Watch(tmp_path, ["--source", etcd.url(), "--dest", str(dest), "--pid-file", str(app.pid_file)])
        watches.append(watch)
        watch.wait_ready()

        etcd.put("/app/a.yaml", "v: 2\n")
        wait_until("one signal for the put", lambda: app.count() == 1)
        assert app.signals()[0].split(" ", 1)[1] == "v: 2"

        etcd.put("/app/b.yaml", "b\n")
        wait_until("the new key", lambda: (dest / "b.yaml").exists())
        etcd.delete("/app/b.yaml")
        wait_until("the deleted key's file to go", lambda: not os.path.lexists(dest / "b.yaml"))
        wait_until("signals for both", lambda: app.count() == 3)

        published = watch.metric("infantry_publishes_total", result="published")
        etcd.txn({"/app/t1": "1", "/app/t2": "2", "/app/a.yaml": "v: 3\n"})
        wait_until("the transaction", lambda: read_as_app(dest) == {"a.yaml": "v: 3\n", "t1": "1", "t2": "2"})
        wait_until("its signal", lambda: app.count() == 4)
        assert holds_for(lambda: app.count() == 4, 1.0)
        assert watch.metric("infantry_publishes_total", result="published") == published + 1
        code, _ = watch.stop()
        assert code == 0
    finally:
        app.stop()


def test_cut_connection_resumes_from_the_last_revision(
    etcd: Etcd, etcd_proxy: CuttableProxy, tmp_path: Path, watches: list[Watch]
) -> None:
    watch, dest = watch_then_cut(etcd, etcd_proxy, tmp_path, watches)
    for i in range(5):
        etcd.put(f"/app/k{i}", f"v{i}")
    etcd.delete("/app/a")
    etcd_proxy.restore()
    wait_until("every update made while cut off", lambda: read_as_app(dest) == as_files(etcd.keys()), timeout=15)
    assert "compacted" not in watch.log()


def test_a_stalled_watch_stream_is_noticed_and_resumed(
    etcd: Etcd, etcd_proxy: CuttableProxy, tmp_path: Path, watches: list[Watch]
) -> None:
    """A connection that stays open but delivers nothing: the probes see the store ahead, and resume."""
    etcd.put("/app/a.yaml", "v: 1\n")
    dest = tmp_path / "D"
    url = f"etcd://127.0.0.1:{etcd_proxy.port}/app/"
    watch = Watch(tmp_path, ["--source", url, "--dest", str(dest), "--interval", "0.3", "--stale-after", "30"])
    watches.append(watch)
    watch.wait_ready()
    # Quiet-stream probes count as unchanged syncs: two of them mean the stream is open and answering.
    wait_until("the watch stream to be open", lambda: watch.metric("infantry_syncs_total", result="unchanged") >= 2)
    etcd_proxy.freeze(b"/v3/watch")  # the watch stream stops delivering; other requests still work
    etcd.put("/app/a.yaml", "v: 2\n")
    wait_until(
        "the change, through a resumed stream",
        lambda: read_as_app(dest) == {"a.yaml": "v: 2\n"},
    )
    assert "stopped delivering changes" in watch.log()
    etcd.delete("/app/a.yaml")
    etcd.put("/app/b.yaml", "b\n")
    wait_until("later changes too", lambda: read_as_app(dest) == {"b.yaml": "b\n"})


def test_compaction_while_disconnected_reads_everything_again(
    etcd: Etcd, etcd_proxy: CuttableProxy, tmp_path: Path, watches: list[Watch]
) -> None:
    watch, dest = watch_then_cut(etcd, etcd_proxy, tmp_path, watches)
    etcd.put("/app/a", "2")
    etcd.put("/app/b", "3")
    etcd.delete("/app/a")
    etcd.compact(etcd.revision())
    etcd_proxy.restore()
    wait_until("the store's content after compaction", lambda: read_as_app(dest) == {"b": "3"}, timeout=15)
    assert "was compacted; reading everything again" in watch.log()


def test_killing_etcd_mid_watch_loses_no_update(etcd: Etcd, tmp_path: Path, watches: list[Watch]) -> None:
    etcd.put("/app/a", "1")
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", etcd.url(), "--dest", str(dest), "--interval", "0.5"])
    watches.append(watch)
    watch.wait_ready()
    etcd.kill()
    wait_until("/healthz to stay up while the store is down", lambda: watch.get("/healthz")[0] in (200, 503))
    assert read_as_app(dest) == {"a": "1"}
    etcd.start()
    for i in range(20):
        etcd.put(f"/app/n{i}", str(i))
    etcd.delete("/app/a")
    wait_until("every update after the restart", lambda: read_as_app(dest) == as_files(etcd.keys()), timeout=20)
    assert len(read_as_app(dest)) == 20


def test_auth_with_token_and_reauthentication(tmp_path: Path, watches: list[Watch]) -> None:
    etcd = Etcd(tmp_path / "etcd", token_ttl=1)
    etcd.start()
    proxy = CuttableProxy(etcd.port)
    try:
        etcd.put("/app/a", "1")
        etcd.enable_auth("reader", "s3cret-pass")
        password = tmp_path / "password"
        password.write_text("s3cret-pass\n")
        dest = tmp_path / "D"
        url = f"etcd://127.0.0.1:{proxy.port}/app/"
        auth = ["--username", "reader", "--password-file", str(password)]
        result = infantry("install", "--source", url, "--dest", str(dest), *auth)
        assert result.returncode == 0, result.stderr
        assert read_as_app(dest) == {"a": "1"}

        password.write_text("wrong\n")
        denied = infantry("install", "--source", url, "--dest", str(tmp_path / "E"), *auth, "--timeout", "3")
        assert denied.returncode == 3
        assert "wrong" not in denied.stderr and "s3cret" not in denied.stderr
        password.write_text("s3cret-pass\n")

        watch = Watch(tmp_path, ["--source", url, "--dest", str(dest), "--interval", "0.5", *auth])
        watches.append(watch)
        watch.wait_ready()
        proxy.cut()
        wait_until("the cut to be noticed", lambda: watch.metric("infantry_syncs_total", result="error") >= 1)
        etcd.put("/app/a", "2")
        # The token lives 1 s without use; once the cut outlasts that, resuming needs a new login.
        cut_at = time.monotonic()
        wait_until("the token to expire", lambda: time.monotonic() - cut_at > 2.5)
        proxy.restore()
        wait_until("the update after logging in again", lambda: read_as_app(dest) == {"a": "2"}, timeout=15)
        assert "the auth token expired; logging in again" in watch.log()
        assert "s3cret" not in watch.log()
    finally:
        proxy.close()
        etcd.stop()


def test_etcds_with_client_certificates(tmp_path: Path, tls_files: TlsFiles) -> None:
    etcd = Etcd(tmp_path / "etcd", tls=tls_files)
    etcd.start()
    try:
        etcd.put("/app/tls.yaml", "secure: true\n")
        dest = tmp_path / "D"
        certs = ["--client-cert", str(tls_files.client_cert), "--client-key", str(tls_files.client_key)]
        result = infantry(
            "install", "--source", etcd.url(), "--dest", str(dest), "--ca-file", str(tls_files.ca), *certs
        )
        assert result.returncode == 0, result.stderr
        assert read_as_app(dest) == {"tls.yaml": "secure: true\n"}
        no_cert = infantry(
            "install",
            "--source",
            etcd.url(),
            "--dest",
            str(tmp_path / "E"),
            "--ca-file",
            str(tls_files.ca),
            "--timeout",
            "2",
        )
        assert no_cert.returncode == 3
        assert tree(tmp_path / "E") == {}
    finally:
        etcd.stop()


def test_ten_thousand_keys_are_read_in_pages(etcd: Etcd, tmp_path: Path) -> None:
    for start in range(0, 10_000, 2_000):
        etcd.txn({f"/app/d{i % 50:02d}/k{i:05d}": f"value {i}" for i in range(start, start + 2_000)})
    dest = tmp_path / "D"
    result = infantry("install", "--source", etcd.url(), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    files = [p for p in (dest / "..data").rglob("*") if p.is_file()]
    assert len(files) == 10_000
    assert (dest / "d07" / "k01207").read_text() == "value 1207"
    assert "published" in result.stderr and "(10000 files)" in result.stderr


def test_unsafe_keys_exit_5_on_install_and_are_survived_by_watch(
    etcd: Etcd, tmp_path: Path, watches: list[Watch]
) -> None:
    etcd.put("/app/good", "1")
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", etcd.url(), "--dest", str(dest), "--interval", "0.5"])
    watches.append(watch)
    watch.wait_ready()
    etcd.put("/app/../escape", "owned")
    bad = infantry("install", "--source", etcd.url(), "--dest", str(tmp_path / "E"))
    assert bad.returncode == 5
    assert "'../escape'" in bad.stderr
    assert tree(tmp_path / "E") == {} and not (tmp_path / "escape").exists()
    wait_until("watch to report the unsafe key", lambda: "'../escape'" in watch.log(), timeout=10)
    assert read_as_app(dest) == {"good": "1"}
    assert watch.proc.poll() is None
    etcd.delete("/app/../escape")
    etcd.put("/app/good", "2")
    wait_until("watch to carry on", lambda: read_as_app(dest) == {"good": "2"}, timeout=15)


def _refused(watch: Watch, refusals: float, why: str) -> bool:
    return watch.metric("infantry_syncs_total", result="unsafe") >= refusals and why in watch.log()


def test_watch_events_are_checked_as_strictly_as_a_whole_read(etcd: Etcd, tmp_path: Path, watches: list[Watch]) -> None:
    """A watched change is checked at the keys it touches only; what it refuses must still be refused."""
    etcd.put("/app/a", "1")
    etcd.put("/app/b", "1")
    dest = tmp_path / "D"
    args = ["--max-files", "4", "--max-file-size", "16", "--max-total-size", "30"]
    watch = Watch(tmp_path, ["--source", etcd.url(), "--dest", str(dest), "--interval", "0.5", *args])
    watches.append(watch)
    watch.wait_ready()
    refusals = 0.0
    # Each change comes in one transaction, so one watch response: the first refusal is the revision's.
    cases: list[tuple[dict[str, bytes | str], str]] = [
        ({"/app/a/x": "2"}, "'a' is both a file and a directory"),
        ({"/app/c/d/e": "2", "/app/c": "3"}, "'c' is both a file and a directory"),
        ({"/app/c": "1", "/app/d": "1", "/app/e": "1"}, "more than 4"),
        ({"/app/b": "x" * 17}, "over the per-file limit of 16"),
        ({"/app/b": "x" * 16, "/app/c": "y" * 16}, "total size passes the limit of 30"),
        ({"/app/c\n": "1"}, "control character"),
    ]
    for bad, why in cases:
        etcd.txn(bad)
        refusals += 1
        refused = functools.partial(_refused, watch, refusals, why)
        wait_until(f"watch to refuse {why!r}", refused, timeout=15)
        assert watch.get("/readyz")[0] == 503
        assert read_as_app(dest) == {"a": "1", "b": "1"}
        for key in bad:
            if key != "/app/b":
                etcd.delete(key)
        etcd.put("/app/b", "1")
        wait_until("watch to recover", lambda: watch.get("/readyz")[0] == 200, timeout=15)
    etcd.put("/app/b", "2")
    wait_until("watch to carry on", lambda: read_as_app(dest) == {"a": "1", "b": "2"}, timeout=15)


def restart_wiped(etcd: Etcd) -> None:
    """Stop etcd, delete its data, and start a brand-new, empty store on the same port."""
    etcd.stop()
    wait_until("etcd's port to close", lambda: not port_open(etcd.port), timeout=10)
    shutil.rmtree(etcd.workdir / "data")
    etcd.start()


def test_a_store_rebuilt_from_scratch_is_read_again(etcd: Etcd, tmp_path: Path, watches: list[Watch]) -> None:
    for key in ("a", "b", "c"):
        etcd.put(f"/app/{key}", "old")
    old_revision = etcd.revision()
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", etcd.url(), "--dest", str(dest), "--interval", "0.5"])
    watches.append(watch)
    watch.wait_ready()
    assert read_as_app(dest) == {"a": "old", "b": "old", "c": "old"}

    restart_wiped(etcd)
    etcd.put("/app/a", "new")
    assert etcd.revision() < old_revision  # the new store is behind the revision the watch would resume from
    wait_until("exactly the rebuilt store's keys", lambda: read_as_app(dest) == {"a": "new"}, timeout=20)
    assert watch.proc.poll() is None, watch.log()
    assert watch.log().count("the store was rebuilt") == 1, watch.log()


def test_an_emptied_destination_with_spooled_values_is_read_again_and_restored(
    etcd: Etcd, tmp_path: Path, watches: list[Watch]
) -> None:
    big = "# a value held in the spool\n" * 100
    etcd.put("/app/big.conf", big)
    etcd.put("/app/small.conf", "s\n")
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", etcd.url(), "--dest", str(dest), "--interval", "0.5"])
    watches.append(watch)
    watch.wait_ready()
    subprocess.run(["rm", "-rf", str(dest)], check=True)  # the spool, inside it, goes too
    wanted = {"big.conf": big, "small.conf": "s\n"}
    wait_until("the set to be restored", lambda: dest.exists() and read_as_app(dest) == wanted, timeout=30)
    assert "reading every source again" in watch.log()
    etcd.put("/app/big.conf", big + "# and followed after\n")
    wait_until("a later change", lambda: read_as_app(dest)["big.conf"].endswith("# and followed after\n"))
