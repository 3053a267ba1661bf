"""The template engine: real renders of real Jinja2 text over real FileEntries (small ones and spooled ones).

The examples of the functions and filters are the README's.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from infantry.errors import SettingsError, UnsafeDataError
from infantry.snapshot import FileEntry, Snapshot
from infantry.spool import Blob
from infantry.templates import MissingKey, Output, Renderer, RenderError, Template, TemplateSyntax
from tests.support import report_figure

Values = Mapping[str, FileEntry]

STORE: dict[str, bytes] = {
    "web/10.0.0.5:8080": b"up",
    "web/10.0.0.6:8080": b"down",
    "web/tls/cert": b"CERT",
    "app/config.json": b'{"workers": 4, "hosts": ["a", "b"]}',
    "app/config.yaml": b"workers: 4\nhosts: [a, b]\n",
    "app/config.toml": b'workers = 4\nhosts = ["a", "b"]\n',
    "app/token.b64": base64.b64encode(b"s3cret"),
    "app/name": "caf\u00e9".encode(),
    "blob/key.der": b"\x30\x82\xff\x00",
}


def entries(store: Mapping[str, bytes]) -> dict[str, FileEntry]:
    return {path: FileEntry(data) for path, data in store.items()}


def render(text: str, store: Mapping[str, bytes] = STORE, *, renderer: Renderer | None = None, **kwargs: Any) -> str:
    """Render one template over ``store`` and return its text."""
    template = Template("out.conf", "mem://t", text.encode(), **kwargs)
    output = (renderer or Renderer()).render(entries(store), [template])
    return output.files["out.conf"].decode()


def failure(text: str, store: Mapping[str, bytes] = STORE, *, renderer: Renderer | None = None) -> RenderError:
    """Render one template that must fail, and return its RenderError."""
    with pytest.raises(RenderError) as caught:
        render(text, store, renderer=renderer)
    return caught.value


# Functions


def test_key_reads_a_value_with_or_without_a_leading_slash() -> None:
    assert render('{{ key("app/name") }} {{ key("/app/name") }}') == "caf\u00e9 caf\u00e9"


def test_key_or_default_gives_the_default_for_an_absent_key() -> None:
    assert render('workers {{ key_or_default("app/workers", "2") }};') == "workers 2;"
    assert render('{{ key_or_default("web/tls/cert", "none") }}') == "CERT"


def test_key_bytes_carries_a_binary_value() -> None:
    assert render('{{ key_bytes("blob/key.der") | b64encode }}') == base64.b64encode(b"\x30\x82\xff\x00").decode()


def test_exists_says_whether_a_key_is_there() -> None:
    text = '{% if exists("web/tls/cert") %}ssl on;{% endif %}{% if exists("web/tls/key") %}key{% endif %}'
    assert render(text) == "ssl on;"


def test_keys_lists_the_files_and_directories_under_a_prefix() -> None:
    assert render('{% for name in keys("web") %}server {{ name }};\n{% endfor %}') == (
        "server 10.0.0.5:8080;\nserver 10.0.0.6:8080;\nserver tls;\n"
    )
    assert render('{{ keys("/web/") }} {{ keys("") }} {{ keys("nothing") }}') == (
        "['10.0.0.5:8080', '10.0.0.6:8080', 'tls'] ['app', 'blob', 'web'] []"
    )


def test_keys_does_not_list_a_sibling_sharing_the_prefix_text() -> None:
    store = {"web/a": b"1", "web-old/b": b"2", "web.bak": b"3", "webx/c": b"4"}
    assert render('{{ keys("web") }}', store) == "['a']"


def test_tree_lists_every_file_under_a_prefix_recursively() -> None:
    text = '{% for path, state in tree("web") %}{{ path }}={{ state }}\n{% endfor %}'
    assert render(text) == "10.0.0.5:8080=up\n10.0.0.6:8080=down\ntls/cert=CERT\n"


def test_dir_gives_nested_dicts() -> None:
    assert render('{{ dir("web").tls.cert }} {{ dir("web")["10.0.0.5:8080"] }}') == "CERT up"
    assert (
        render('{{ dir("web") | tojson }}')
        == '{"10.0.0.5:8080": "up", "10.0.0.6:8080": "down", "tls": {"cert": "CERT"}}'
    )


def test_env_reads_only_the_listed_names() -> None:
    renderer = Renderer(env_names=["POD_NAME", "ZONE"], environ={"POD_NAME": "web-0", "SECRET": "x"})
    assert render('name {{ env("POD_NAME") }};', renderer=renderer) == "name web-0;"
    assert "list 'SECRET' in template_env" in str(failure('{{ env("SECRET") }}', renderer=renderer))
    assert "'ZONE' is not set" in str(failure('{{ env("ZONE") }}', renderer=renderer))


def test_fail_stops_the_render_with_its_message_and_line() -> None:
    error = failure('{% if not exists("web/tls/cert") %}\n{{ fail("no certificate") }}\n{% endif %}', {"a": b"1"})
    assert str(error) == "template out.conf (mem://t) line 2: no certificate"
    assert error.line == 2
    assert error.template == "out.conf"
    assert isinstance(error, UnsafeDataError)


# Filters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{{ (key("app/config.json") | fromjson).workers }}', "4"),
        ('{{ (key("app/config.yaml") | fromyaml).hosts | join(",") }}', "a,b"),
        ('{{ (key("app/config.toml") | fromtoml).hosts[1] }}', "b"),
        ('password={{ key("app/token.b64") | b64decode }}', "password=s3cret"),
        ('{{ "s3cret" | b64encode }}', "czNjcmV0"),
        ('{{ {"hosts": keys("web")} | tojson }}', '{"hosts": ["10.0.0.5:8080", "10.0.0.6:8080", "tls"]}'),
        ('{{ {"b": 1, "a": [2]} | toyaml }}', "b: 1\na:\n- 2\n"),
        ('certs:\n  {{ "a\\nb" | indent(2) }}', "certs:\n  a\n  b"),
        ('{{ key("web/tls/cert") | sha256 }}', hashlib.sha256(b"CERT").hexdigest()),
        ('{{ key_bytes("blob/key.der") | sha256 }}', hashlib.sha256(b"\x30\x82\xff\x00").hexdigest()),
    ],
)
def test_filter(text: str, expected: str) -> None:
    assert render(text) == expected


@pytest.mark.parametrize(
    ("value", "text", "named"),
    [
        (b'{"a": ', '{{ key("v") | fromjson }}', "fromjson: not valid JSON"),
        (b"a: [\n  password: hunter2", '{{ key("v") | fromyaml }}', "fromyaml: not valid YAML at line"),
        (b"a = = hunter2", '{{ key("v") | fromtoml }}', "fromtoml: not valid TOML"),
        (b"!!!hunter2", '{{ key("v") | b64decode }}', "b64decode: not valid base64"),
        (base64.b64encode(b"\xff\xfe"), '{{ key("v") | b64decode }}', "b64decode: the decoded bytes are not UTF-8"),
        (b"x", '{{ key_bytes("v") | tojson }}', "tojson:"),
    ],
)
def test_a_filter_that_cannot_decode_names_itself_and_not_the_value(value: bytes, text: str, named: str) -> None:
    error = failure(text, {"v": value})
    assert named in str(error)
    assert "hunter2" not in str(error)
    assert error.line == 1


# Missing keys, bad values, errors


def test_a_missing_key_under_error_names_template_line_and_key() -> None:
    with pytest.raises(MissingKey) as caught:
        render('upstream {\n  server {{ key("web/10.0.0.9:8080") }};\n}\n', missing="error")
    assert str(caught.value) == "template out.conf (mem://t) line 2: key 'web/10.0.0.9:8080' is missing"
    assert (caught.value.line, caught.value.key, caught.value.template) == (2, "web/10.0.0.9:8080", "out.conf")


def test_skip_and_wait_leave_the_template_out_and_say_why() -> None:
    templates = [
        Template("a.conf", "mem://a", b'{{ key("later/a") }}', "skip"),
        Template("b.conf", "mem://b", b'{{ key("later/b") }}', "wait"),
        Template("c.conf", "mem://c", b'{{ key("web/tls/cert") }}', "error"),
    ]
    renderer = Renderer()
    output = renderer.render(entries(STORE), templates)
    assert output.files == {"c.conf": b"CERT"}
    assert output.skipped == {"a.conf": "key 'later/a' is missing"}
    assert output.waiting == {"b.conf": "later/b"}
    # The keys appear: both render, and c.conf, whose input did not change, is reused.
    later = renderer.render(entries({**STORE, "later/a": b"A", "later/b": b"B"}), templates)
    assert later == Output(
        files={"a.conf": b"A", "b.conf": b"B", "c.conf": b"CERT"}, skipped={}, waiting={}, rendered=["a.conf", "b.conf"]
    )


def test_a_value_that_is_not_utf8_names_the_key_and_suggests_key_bytes() -> None:
    error = failure('\n{{ key("blob/key.der") }}')
    assert str(error) == (
        "template out.conf (mem://t) line 2: key 'blob/key.der' is not UTF-8 text; "
        "use key_bytes('blob/key.der')|b64encode to carry its bytes"
    )
    assert error.key == "blob/key.der"


def test_an_undefined_variable_is_a_render_error_with_its_line() -> None:
    error = failure("a\nb\n{{ worker_count }}\n")
    assert error.line == 3
    assert "'worker_count' is undefined" in str(error)


def test_the_line_is_found_inside_a_macro() -> None:
    error = failure('{% macro server(name) %}\n  server {{ key(name) }};\n{% endmacro %}\n{{ server("gone") }}')
    assert isinstance(error, MissingKey)
    assert error.line == 2


def test_a_syntax_error_names_its_line_on_check_and_on_render() -> None:
    template = Template("nginx/up.conf", "https://store/t", b"upstream {\n  server a;\n  {{ key('web' }}\n}\n")
    with pytest.raises(TemplateSyntax) as caught:
        Renderer().check(template)
    assert str(caught.value).startswith("template nginx/up.conf (https://store/t) line 3: ")
    assert str(caught.value).endswith("line 3: unexpected '}', expected ')'")
    assert caught.value.line == 3
    assert isinstance(caught.value, SettingsError)
    with pytest.raises(TemplateSyntax, match="line 3"):
        Renderer().render(entries(STORE), [template])


def test_an_unknown_filter_is_a_syntax_error() -> None:
    with pytest.raises(TemplateSyntax, match=r"line 2: No filter named 'frobnicate'"):
        Renderer().check(Template("t", "mem://t", b"\n{{ 1 | frobnicate }}"))


@pytest.mark.parametrize(
    "text", ["{{ " + "(" * 300 + "1" + ")" * 300 + " }}", "{% if 1 %}" * 120 + "{% endif %}" * 120]
)
def test_too_deep_a_nesting_is_a_syntax_error(text: str) -> None:
    with pytest.raises(TemplateSyntax, match="nests too deeply"):
        Renderer().check(Template("t", "mem://t", text.encode()))


def test_concatenation_escapes_inside_an_autoescape_block() -> None:
    assert render('{% autoescape true %}{{ "<" ~ key("web/tls/cert") }}{% endautoescape %}{{ "<" ~ 1 }}') == (
        "&lt;CERT<1"
    )


def test_two_templates_may_not_write_one_file() -> None:
    twice = [Template("t", "mem://1", b"1"), Template("t", "mem://2", b"2")]
    with pytest.raises(SettingsError, match="two templates write t"):
        Renderer().render(entries(STORE), twice)


def test_a_spooled_value_is_read_through_the_spool() -> None:
    large = b"server 10.0.0.%d;\n" * 100
    values = {"nginx/servers": FileEntry(large), "nginx/small": FileEntry(b"x")}
    assert isinstance(values["nginx/servers"].content, Blob)  # held in a spool file, not in memory
    template = Template(
        "out", "mem://t", b'{{ key("nginx/servers") }}{% for p, v in tree("nginx") %}{{ p }}{% endfor %}'
    )
    output = Renderer().render(values, [template])
    assert output.files["out"] == large + b"serverssmall"


def test_the_spool_files_of_the_values_outlive_the_render_child() -> None:
    values = {"big": FileEntry(b"x" * 1000), "gone": FileEntry(b"y" * 1000)}
    blob = values["big"].content
    assert isinstance(blob, Blob)
    # The child reads the spool file, drops its references and exits: the file is still the parent's.
    template = Template("t", "mem://t", b'{{ key("big") | length }}{{ key("gone") | length }}')
    assert Renderer().render(values, [template]).files == {"t": b"10001000"}
    assert blob.read() == b"x" * 1000


def test_a_failure_quoting_a_value_does_not_show_it() -> None:
    # The sandbox's message for a missing attribute quotes its name, here a value from the store.
    error = failure('{{ {"a": 1}[key("db/password")] }}', {"db/password": b"hunter2-secret"})
    assert "hunter2" not in str(error)
    assert "<a value>" in str(error)
    assert error.__cause__ is None


def test_the_renderer_keeps_no_spool_file_alive() -> None:
    values = {"big": FileEntry(b"x" * 1000)}
    blob = values["big"].content
    assert isinstance(blob, Blob)
    released = weakref.ref(blob)
    renderer = Renderer()
    template = Template("t", "mem://t", b'{{ key("big") | length }}')
    assert renderer.render(values, [template]).files == {"t": b"1000"}
    del values, blob
    gc.collect()
    assert released() is None  # so its spool file was removed
    # The memo still knows the content: the same bytes, spooled again, are not a change.
    assert renderer.render({"big": FileEntry(b"x" * 1000)}, [template]).rendered == []
    assert renderer.render({"big": FileEntry(b"y" * 1000)}, [template]).rendered == ["t"]


# Only what changed


def test_only_the_templates_that_read_a_changed_key_render_again() -> None:
    templates = [
        Template("a", "mem://a", b'{{ key("app/name") }}'),
        Template("b", "mem://b", b'{{ key("web/tls/cert") }}'),
        Template("c", "mem://c", b'{{ key_or_default("app/absent", "-") }}'),
    ]
    renderer = Renderer()
    assert renderer.render(entries(STORE), templates).rendered == ["a", "b", "c"]
    assert renderer.render(entries(STORE), templates).rendered == []  # equal values, new mapping: all reused
    changed = renderer.render(entries({**STORE, "web/tls/cert": b"NEW"}), templates)
    assert changed.rendered == ["b"]
    assert changed.files == {"a": "caf\u00e9".encode(), "b": b"NEW", "c": b"-"}
    appeared = renderer.render(entries({**STORE, "web/tls/cert": b"NEW", "app/absent": b"+"}), templates)
    assert appeared.rendered == ["c"]
    assert appeared.files["c"] == b"+"


def test_a_key_checked_with_exists_appearing_renders_the_template_again() -> None:
    template = Template("ssl.conf", "mem://t", b'{% if exists("web/tls/key") %}ssl on;{% else %}ssl off;{% endif %}')
    renderer = Renderer()
    assert renderer.render(entries(STORE), [template]).files == {"ssl.conf": b"ssl off;"}
    appeared = renderer.render(entries({**STORE, "web/tls/key": b"KEY"}), [template])
    assert appeared.rendered == ["ssl.conf"]
    assert appeared.files == {"ssl.conf": b"ssl on;"}
    # exists() looked at presence only: a new content for the key changes nothing.
    assert renderer.render(entries({**STORE, "web/tls/key": b"KEY2"}), [template]).rendered == []


def test_a_change_in_a_listing_renders_its_users_again() -> None:
    names = Template("names", "mem://n", b'{% for name in keys("web") %}server {{ name }};{% endfor %}')
    states = Template("states", "mem://s", b'{% for path, state in tree("web") %}{{ path }}={{ state }};{% endfor %}')
    other = Template("other", "mem://o", b'{{ keys("app") | length }}')
    renderer = Renderer()
    renderer.render(entries(STORE), [names, states, other])
    # A value under web/ changes: the names under it are the same, its tree is not.
    assert renderer.render(entries({**STORE, "web/10.0.0.6:8080": b"up"}), [names, states, other]).rendered == [
        "states"
    ]
    added = renderer.render(entries({**STORE, "web/10.0.0.6:8080": b"up", "web/10.0.0.7:8080": b"up"}), [names, states])
    assert added.rendered == ["names", "states"]
    assert b"server 10.0.0.7:8080;" in added.files["names"]


def test_a_changed_text_renders_again_and_a_removed_template_is_forgotten() -> None:
    renderer = Renderer()
    first = Template("t", "mem://t", b'{{ key("app/name") }}')
    renderer.render(entries(STORE), [first])
    second = Template("t", "mem://t", b'name={{ key("app/name") }}')
    assert renderer.render(entries(STORE), [second]).files == {"t": "name=caf\u00e9".encode()}
    assert renderer.render(entries(STORE), []).files == {}
    assert renderer.render(entries(STORE), [second]).rendered == ["t"]


def test_a_one_key_change_among_a_thousand_templates_renders_one() -> None:
    store = {f"svc/s{i // 10}/k{i % 10}": f"v{i}".encode() for i in range(10_000)}
    templates = [
        Template(f"out/t{j}.conf", "mem://t", "".join(f'{{{{ key("svc/s{j}/k{k}") }}}}\n' for k in range(10)).encode())
        for j in range(1000)
    ]
    renderer = Renderer()
    started = time.perf_counter()
    first = renderer.render(Snapshot.of(entries(store)).files, templates)
    first_s = time.perf_counter() - started
    assert len(first.files) == 1000
    assert first.files["out/t7.conf"] == b"".join(b"v%d\n" % (70 + k) for k in range(10))
    changes: list[float] = []
    for n in range(9):  # each a fork, one template rendered in the child, one frame back
        changed = Snapshot.of(entries({**store, "svc/s123/k4": b"new%d" % n})).files
        started = time.perf_counter()
        output = renderer.render(changed, templates)
        changes.append(time.perf_counter() - started)
        assert output.rendered == ["out/t123.conf"]
        assert b"new%d\n" % n in output.files["out/t123.conf"]
    report_figure(
        f"templates: 1,000 templates x 10 keys over 10,000 values: first render {first_s:.2f} s "
        f"(compiling included), a one-key change {statistics.median(changes) * 1000:.1f} ms (median of 9)"
    )


# Bounds


@pytest.fixture
def sentinel_trace() -> Iterator[Callable[..., Any]]:
    """A trace function standing in for coverage's or a debugger's, which a render must put back."""

    def trace(frame: FrameType, event: str, arg: object) -> None:
        return None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield trace
    finally:
        sys.settrace(previous)


def test_an_endless_loop_is_stopped_by_the_time_limit(sentinel_trace: Callable[..., Any]) -> None:
    renderer = Renderer(timeout=0.5)
    endless = "a\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    error = failure(endless, renderer=renderer)
    elapsed = time.monotonic() - started
    assert sys.gettrace() is sentinel_trace
    assert str(error) == "template out.conf (mem://t): took longer than 0.5s"
    assert error.line is None
    assert elapsed < 1.5
    assert render('{{ key("web/tls/cert") }}', renderer=renderer) == "CERT"  # the renderer still works
    assert sys.gettrace() is sentinel_trace


def test_a_loop_that_calls_nothing_is_stopped_between_iterations() -> None:
    # No call happens inside: only the check on every template line sees the time pass.
    renderer = Renderer(timeout=0.5)
    text = "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    assert "took longer than 0.5s" in str(failure(text, renderer=renderer))
    assert time.monotonic() - started < 1.5


def test_a_loop_inside_a_filter_is_stopped_too() -> None:
    # The loop runs in Jinja's own code (map over a range), not on a template line.
    renderer = Renderer(timeout=0.5)
    text = '{% for i in range(100000) %}{{ range(100000) | map("string") | select | list | length }}{% endfor %}'
    started = time.monotonic()
    assert "took longer than 0.5s" in str(failure(text, renderer=renderer))
    assert time.monotonic() - started < 1.5


def test_output_stops_at_the_cap() -> None:
    error = failure("a\n{% for i in range(100000) %}0123456789{% endfor %}", renderer=Renderer(max_output=1000))
    assert str(error) == "template out.conf (mem://t) line 2: output passes 1000 bytes"
    assert render("{% for i in range(100) %}0123456789{% endfor %}", renderer=Renderer(max_output=1000)) == (
        "0123456789" * 100
    )


@pytest.mark.parametrize(
    "text",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('id') }}",
        "{{ self._TemplateReference__context.cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ range(10**12) | list }}",
        "{{ ().__class__.__base__.__subclasses__() }}",
        "{{ key.__self__ }}",
        "{{ joiner.__call__.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ '' | attr('__class__') }}",
        "{{ config.items() }}",
        "{{ request.application.__globals__ }}",
        "{{ [].append(1) }}{{ {}.update(a=1) }}",
    ],
)
def test_a_sandbox_escape_is_refused(text: str) -> None:
    failure(text)


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ('{{ "x" * 1000000000 }}', "'*' would make a value"),
        ('{{ ["x"] * 1000000000 }}', "'*' would make a value"),
        ('{{ ["x" * 1000000] * 100 }}', "'*' would make a value"),
        ("{{ 2 ** 100000000 }}", "'**' would make an integer"),
        ("{% set n = 2 ** 4000 %}{{ n * n * n }}", "'*' would make an integer"),
        ('{{ "%999999999d" % 1 }}', "'%' formatting"),
        ('{{ "%*d" % (999999999, 1) }}', "'*' width"),
        ('{{ "%999999999d" | format(1) }}', "'%' formatting"),
        ('{{ "{0:999999999}".format(1) }}', "str.format"),
        ('{{ "{x}".format_map({"x": 1}) }}', "str.format"),
        ('{{ "x" | center(1000000000) }}', "center width"),
        ('{{ "x".center(1000000000) }}', "center width"),
        ('{{ "x".ljust(1000000000) }}', "ljust width"),
        ('{{ "x" | indent(1000000000) }}', "indent"),
        ('{{ "x y" | wordwrap(1000000000) }}', "wordwrap width"),
        ('{{ "x" | truncate(1000000000) }}', "truncate length"),
        ('{{ ("x" * 1000000) | replace("x", "yyyyyyyyyy") }}', "replace"),
        ('{{ ("x" * 1000000).replace("", "yyyyyyyyyy") }}', "replace"),
        ('{{ ("\t" * 1000000).expandtabs(100) }}', "expandtabs"),
        ('{{ (["x" * 1000000] * 8) | join("x" * 1000000) }}', "join"),
        ('{{ ("x" * 1000000).join(["a"] * 10) }}', "join"),
        ('{{ [1] | batch(1000000000, "x") | list }}', "batch size"),
        ("{{ [1] | slice(1000000000) | list }}", "slice count"),
        (
            "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "'~' would make a value",
        ),
        (
            "{% set ns = namespace(s=['x']) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "'+' would make a value",
        ),
        (
            "{% set ns = namespace(s=['x' * 1000]) %}{% for i in range(64) %}"
            "{% set ns.s = [ns.s, ns.s] | sum(start=[]) %}{% endfor %}",
            "sum would make a value",
        ),
        (
            "{% macro grow(s, n) %}{{ grow(s ~ s, n - 1) if n else s | length }}{% endmacro %}{{ grow('xx', 64) }}",
            "'~' would make a value",
        ),
        ("{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s] }}", "printing"),
    ],
)
def test_a_memory_bomb_is_refused_before_it_allocates(text: str, refusal: str) -> None:
    error = failure(text)
    assert refusal in str(error)
    assert error.line == 1


def test_values_held_by_a_deep_recursion_are_bounded_in_all() -> None:
    # Each level holds a new value under the limit; together they would pass it many times over.
    text = "{% macro f(s, n) %}{{ f(s ~ 'x', n + 1) }}{% endmacro %}{{ f('x' * 1000000, 0) }}"
    renderer = Renderer(max_output=2_000_000)
    error = failure(text, renderer=renderer)
    assert "the values built by this render pass 8000000 bytes in all" in str(error)
    # The count starts again for each render.
    assert render("{{ ('x' * 1000000) | length }}", renderer=renderer) == "1000000"


def test_a_yaml_alias_bomb_is_refused_when_written_out() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    assert "tojson would make a value" in str(
        failure('{{ key("bomb") | fromyaml | tojson }}', {"bomb": laughs.encode()})
    )
    assert "printing" in str(failure('{{ key("bomb") | fromyaml }}', {"bomb": laughs.encode()}))


def test_include_import_and_extends_are_refused_when_compiled() -> None:
    for text, tag in [
        ("a\n{% include 'other.j2' %}", "include"),
        ("a\n{% import 'macros.j2' as m %}", "import"),
        ("a\n{% from 'macros.j2' import server %}", "from ... import"),
        ("a\n{% extends 'base.j2' %}", "extends"),
    ]:
        with pytest.raises(TemplateSyntax) as caught:
            Renderer().check(Template("t", "mem://t", text.encode()))
        assert str(caught.value) == (
            f"template t (mem://t) line 2: templates are one file each; {{% {tag} %}} is not available"
        )
        assert caught.value.line == 2


# Limits the render child holds: memory, C-level time, the caller's thread


def _children() -> set[int]:
    """This process's child processes, live or zombie (from /proc, as an app's supervisor would see)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


# Ten levels of lists, each level ten references to the one below: cheap to build, 10**10 items to compare.
NESTED = "".join(
    f"{{% set {name}{level} = [{', '.join(['0' if level == 0 else f'{name}{level - 1}'] * 10)}] %}}"
    for name in "ab"
    for level in range(10)
)


@pytest.mark.parametrize(
    "text",
    [
        '{% set l = ("x," * 4000000).split(",") %}{{ [l, l, l, l, l, l, l, l, l, l] | map("list") | list | length }}',
        '{% set s = "x" * 8000000 %}{{ s | list | batch(1) | list | length }}',
        '{% set s = "<" * 8000000 %}{{ s | forceescape | forceescape | forceescape | forceescape | length }}',
        '{% set l = ("x," * 1000000).split(",") %}'
        "{% macro f(n) %}{% set m = l | list %}{{ f(n - 1) if n else m | length }}{% endmacro %}{{ f(300) }}",
    ],
    ids=["split-map-list", "list-batch", "forceescape", "deep-macro"],
)
def test_a_memory_bomb_the_estimates_miss_is_stopped_by_the_memory_budget(text: str) -> None:
    renderer = Renderer(memory=64 * 1024 * 1024, timeout=10)
    before = _children()
    started = time.monotonic()
    error = failure(text, renderer=renderer)
    assert time.monotonic() - started < 5
    assert str(error) == "template out.conf (mem://t) line 1: used more than 64 MiB"
    assert _children() == before  # the child is reaped
    assert render('{{ key("web/tls/cert") }}', renderer=renderer) == "CERT"


_BUDGET_SCRIPT = """
import resource
from infantry import memory
from infantry.snapshot import FileEntry
from infantry.templates import RenderError, Renderer, Template
memory.one_arena()  # as the agent runs: one malloc arena, so no address space is reserved and unused
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
text = '{% set l = ("x," * 4000000).split(",") %}{{ [l, l, l, l, l, l, l, l, l, l] | map("list") | list | length }}'
try:
    Renderer().render({"k": FileEntry(b"v")}, [Template("out.conf", "mem://t", text.encode())])
    print("rendered")
except RenderError as exc:
    print(exc)
print("grew", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak)
"""


def test_the_default_memory_budget_holds_and_the_caller_does_not_grow() -> None:
    # In a process of its own, set up as the agent is: the budget is counted from the address space the
    # process has, and a test runner that made many threads holds many malloc arenas of reserved space.
    result = subprocess.run([sys.executable, "-c", _BUDGET_SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "used more than 256 MiB" in lines[0], result.stdout
    # The child built hundreds of MiB; the caller built none of them.
    assert int(lines[1].split()[1]) < 64 * 1024, result.stdout


def test_one_long_c_call_is_ended_by_killing_the_child() -> None:
    # a9 == b9 is one comparison in C: no trace function sees it, and it would hold the GIL for minutes.
    renderer = Renderer(timeout=0.3)
    before = _children()
    started = time.monotonic()
    error = failure(NESTED + "\n{{ a9 == b9 }}", renderer=renderer)
    assert time.monotonic() - started < 2.5
    assert str(error) == "template out.conf (mem://t): took longer than 0.3s"
    assert _children() == before
    assert render('{{ key("web/tls/cert") }}', renderer=renderer) == "CERT"


def test_the_callers_other_threads_run_while_a_template_renders() -> None:
    # a8 == b8 holds the GIL for about two seconds in one C call; in a child, only the child's GIL.
    renderer = Renderer(timeout=0.2)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            render(NESTED + "{{ a8 == b8 }}", renderer=renderer)
        except RenderError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    longest_gap = 0.0
    last = time.monotonic()
    while thread.is_alive():
        now = time.monotonic()
        longest_gap = max(longest_gap, now - last)
        last = now
    thread.join()
    assert longest_gap < 0.25
    assert len(outcome) == 1 and "took longer than 0.2s" in str(outcome[0])


class _Interrupted(Exception):
    pass


def test_a_caller_interrupted_while_waiting_leaves_no_child() -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    before = _children()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    started = time.monotonic()
    try:
        with pytest.raises(_Interrupted):
            render(NESTED + "{{ a9 == b9 }}", renderer=Renderer(timeout=30))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 2
    assert _children() == before


def test_a_child_killed_by_a_signal_names_the_signal_and_the_budget() -> None:
    # What the kernel's OOM killer does to a child over the pod's limit, done here by the test.
    renderer = Renderer(timeout=30, memory=100 * 1024 * 1024)
    errors: list[RenderError] = []

    def run() -> None:
        try:
            render(NESTED + "{{ a9 == b9 }}", renderer=renderer)
        except RenderError as exc:
            errors.append(exc)

    before = _children()
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while not (_children() - before) and time.monotonic() < deadline:
        pass
    for pid in _children() - before:
        os.kill(pid, signal.SIGKILL)
    thread.join(10)
    assert len(errors) == 1
    assert str(errors[0]) == (
        "template out.conf (mem://t): the render ended by signal 9 (over the memory budget of 100 MiB?)"
    )
    assert _children() == before


# Timeouts are one message per template and input


def test_a_timeout_names_no_line_so_the_same_template_fails_the_same_way() -> None:
    # The clock fires on whichever of the loop's lines runs at that moment: the message names none.
    text = "{% for i in range(100000) %}{% for j in range(100000) %}\n{% set x = i * j %}\n{% set y = x + 1 %}\n"
    text += "{% if y %}\n{% endif %}\n{% endfor %}{% endfor %}"
    renderer = Renderer(timeout=0.1)
    errors = [failure(text, renderer=renderer) for _ in range(5)]
    assert {str(error) for error in errors} == {"template out.conf (mem://t): took longer than 0.1s"}
    assert {error.line for error in errors} == {None}


# Secrets stay out of messages

PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nsecretsecretsecretline\n-----END PRIVATE KEY-----\n"
)
SECRETS = {"pem": PEM.encode(), "pw": b"hunter2-secret-pw", "quoted": b'it\'s "hunter2"\tand\\more'}


@pytest.mark.parametrize(
    "text",
    [
        '{{ {}[key("pem")] }}',
        '{{ {}[key("quoted")] }}',
        '{{ key(key("pw")) }}',
        '{{ key(key("pem")) }}',
        '{{ key_bytes(key("quoted")) }}',
        '{{ env(key("pw")) }}',
        '{{ fail(key("pem")) }}',
        '{{ fail(key("pem").splitlines()[1][3:20]) }}',
        '{{ (key("quoted") | attr(key("pw")))() }}',
        '{{ {key("pem"): 1}[key("pw")] }}',
        '{{ key("pw").nothing_here() }}',
    ],
)
def test_no_message_quotes_a_value_in_any_form(text: str) -> None:
    error = failure(text, SECRETS)
    message = f"{error} {error.key}"
    for value in SECRETS.values():
        for form in (value.decode(), repr(value.decode())[1:-1], *value.decode().splitlines()):
            assert form not in message
    assert "hunter2" not in message and "secretsecret" not in message and "MIIEvQ" not in message


def test_a_missing_key_built_from_a_value_is_redacted_also_where_it_waits_or_is_skipped() -> None:
    templates = [
        Template("skip", "mem://s", b'{{ key(key("pw")) }}', "skip"),
        Template("wait", "mem://w", b'{{ key(key("pw")) }}', "wait"),
    ]
    output = Renderer().render(entries(SECRETS), templates)
    assert output.skipped == {"skip": "key '<a value>' is missing"}
    assert output.waiting == {"wait": "<a value>"}
    with pytest.raises(MissingKey) as caught:
        render('{{ key(key("pw")) }}', SECRETS)
    assert str(caught.value) == "template out.conf (mem://t) line 1: key '<a value>' is missing"
    assert caught.value.key == "<a value>"


def test_an_env_value_is_redacted_like_a_value() -> None:
    token = "s3cr'et\"tok\ten"
    renderer = Renderer(env_names=["TOKEN"], environ={"TOKEN": token})
    for text in ('{{ {}[env("TOKEN")] }}', '{{ key(env("TOKEN")) }}', '{{ env(env("TOKEN")) }}'):
        message = str(failure(text, renderer=renderer))
        assert "<a value>" in message
        assert "s3cr" not in message and "tok" not in message, message


@pytest.mark.parametrize(
    ("value", "filter_", "expected"),
    [
        (b'{"a": "x\\qhunter2"}', "fromjson", "fromjson: not valid JSON at line 1 column 9: Invalid \\escape"),
        (b"a: 1\nb: !hunter2 x\n", "fromyaml", "fromyaml: not valid YAML at line 2 column 4"),
        (b"a: !!python/name:hunter2.x ''\n", "fromyaml", "fromyaml: not valid YAML at line 1 column 4"),
        (b"a: [1, 2\nhunter2: 3", "fromyaml", "fromyaml: not valid YAML at line 2"),
        (b'a = "hunter2\x01"', "fromtoml", "fromtoml: not valid TOML at line 1, column 13"),
        (b"hunter2 = = 1", "fromtoml", "fromtoml: not valid TOML at line 1, column 11"),
        (b"aHVudGVyMg=x", "b64decode", "b64decode: not valid base64"),
    ],
)
def test_a_decoder_says_where_and_what_kind_never_the_text(value: bytes, filter_: str, expected: str) -> None:
    error = failure(f'{{{{ key("v") | {filter_} }}}}', {"v": value})
    assert expected in str(error)
    assert "hunter2" not in str(error) and "aHVu" not in str(error)
