"""From what the sources answered to the one set that is published.

Sources hold values; templates turn them into files. The set to publish is the values that ``--raw``
keeps, plus each template rendered over all the values, as one Snapshot: it goes through the check
gate, the atomic swap, one reload and verify like any other set, so an app never sees some templates
new and others old. With no template, the set is the values, as it always was.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from infantry.errors import SettingsError, UnsafeDataError
from infantry.settings import Settings, TemplateSpec, redact_url, template_groups
from infantry.snapshot import FileEntry, Part, Snapshot, entry_with_mode, find_file_dir_clash, merge, printable

if TYPE_CHECKING:
    from infantry.templates import Renderer

logger = logging.getLogger(__name__)


def is_template_syntax(error: BaseException) -> bool:
    """Whether ``error`` is a template that does not compile (without loading Jinja2 to ask)."""
    templates = sys.modules.get("infantry.templates")
    return templates is not None and isinstance(error, templates.TemplateSyntax)


def is_render_error(error: BaseException) -> bool:
    """Whether ``error`` is a template that failed to render (without loading Jinja2 to ask)."""
    templates = sys.modules.get("infantry.templates")
    return templates is not None and isinstance(error, templates.RenderError)


class KeyAwaited(UnsafeDataError):
    """A template with ``missing: wait`` reads a key the store does not hold yet."""

    def __init__(self, template: str, key: str) -> None:
        super().__init__(template, f"waiting for key {key!r} (missing: wait)")
        self.key = key


class Assembler:
    """Values and template texts in, the set to publish out; remembers renders, to redo only what changed."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self.templates: list[TemplateSpec] = list(settings.template)
        # The sources that read the templates' texts, and which of them (and which file) each reads.
        self.groups, self._picks = template_groups(self.templates)
        self._raw = settings.raw_prefixes()
        self._file_mode = settings.file_mode
        self._renderer: Renderer | None = None
        if self.templates:  # Jinja2 is loaded only when there is a template: watch stays small without
            from infantry.templates import Renderer

            self._renderer = Renderer(
                env_names=settings.template_env,
                environ=os.environ if environ is None else environ,
                max_output=int(settings.max_file_size),
                timeout=settings.render_timeout,
                # A render's child may use this much beyond what it inherits: within the pod's 128 MiB
                # limit by default (and if the pod runs short anyway, the kernel kills the child first).
                memory=max(64 << 20, 4 * int(settings.max_file_size)),
            )
        self._skipped: dict[str, str] = {}  # the templates left out (missing: skip) by the last assemble

    def assemble(self, values: Sequence[Part], texts: Sequence[Snapshot]) -> Snapshot:
        """The set to publish, from the value sources' parts and each template source's snapshot.

        Raises RenderError (a template failed), KeyAwaited (a template waits for a key), TemplateSyntax,
        or SettingsError (sources, or a template and a value, claim the same path).
        """
        merged = merge(values)
        if self._renderer is None:
            return merged if self._raw is None else self._publish_raw(merged, {})
        from infantry.templates import Template

        if len(texts) != len(self.groups):
            raise AssertionError(f"{len(texts)} template sources answered, for {len(self.groups)}")
        templates = [
            Template(
                dest=spec.dest, src=redact_url(spec.src), text=_text(spec, texts[group], name), missing=spec.missing
            )
            for spec, (group, name) in zip(self.templates, self._picks, strict=True)
        ]
        output = self._renderer.render(merged.files, templates)
        for dest, why in output.skipped.items():
            if self._skipped.get(dest) != why:
                logger.info("template %s left out of the set (missing: skip): %s", dest, why)
        self._skipped = dict(output.skipped)
        if output.waiting:
            dest, key = next(iter(output.waiting.items()))
            spec = next(s for s in self.templates if s.dest == dest)
            raise KeyAwaited(f"template {dest} ({redact_url(spec.src)})", key)
        rendered: dict[str, FileEntry] = {}
        for spec in self.templates:
            if spec.dest in output.files:
                data = output.files[spec.dest]
                mode = spec.mode
                rendered[spec.dest] = FileEntry(data) if mode is None else entry_with_mode(data, mode, self._file_mode)
        return self._publish_raw(merged, rendered)

    def _publish_raw(self, merged: Snapshot, rendered: dict[str, FileEntry]) -> Snapshot:
        files: dict[str, FileEntry] = {}
        if self._raw is None:
            files.update(merged.files)
        elif self._raw:
            for path, entry in merged.files.items():
                if any(path == p or path.startswith(f"{p}/") for p in self._raw):
                    files[path] = entry
        for dest, entry in rendered.items():
            if dest in files:
                raise SettingsError(
                    f"template {dest}: the store also has a value at {printable(dest)}, which --raw publishes; "
                    "give the template another dest, or leave that value out of --raw"
                )
            files[dest] = entry
        if not files:
            raise UnsafeDataError(
                "templates", "nothing to publish: every template was skipped, and --raw publishes no value"
            )
        clash = find_file_dir_clash(files)
        if clash is not None:
            raise SettingsError(f"{printable(clash)} is both a file and a directory in the set to publish")
        return Snapshot.of(files)


def _text(spec: TemplateSpec, snapshot: Snapshot, name: str | None) -> bytes:
    """The template's text: the file ``name`` of the source it shares, or the one file its source holds."""
    if name is not None:
        if name not in snapshot.files:
            raise UnsafeDataError(redact_url(spec.src), "the template is not there (no such file or key)")
        return snapshot.files[name].data
    if len(snapshot.files) != 1:
        raise UnsafeDataError(
            redact_url(spec.src), f"a template source must hold one file, and this one holds {len(snapshot.files)}"
        )
    return next(iter(snapshot.files.values())).data
