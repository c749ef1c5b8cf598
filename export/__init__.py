"""PyTorch -> ONNX FP32: export, numeric validation, graph optimization, the bundle.

    from quantgate.export import ExportConfig, export
    bundle = export("artifacts/digits-small", "bundles/digits", cfg=ExportConfig())

Later stages run between the two halves::

    result = export_fp32(spec, workdir, cfg=cfg)   # validated FP32 + samples + report
    bundle = write_bundle(result, out, variants=[ExtraVariant(...)], report_sections=[...])

Names load lazily, so ``ExportConfig`` (and the CLI's --help) need no torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantgate._lazy import exports

_WHERE = {
    "ExportConfig": "config",
    "Exporter": "config",
    "ExportResult": "pipeline",
    "export": "pipeline",
    "export_fp32": "pipeline",
    "Case": "validation",
    "ValidationReport": "validation",
    "validate": "validation",
    "ExtraVariant": "writer",
    "render_report": "writer",
    "write_bundle": "writer",
}
__all__ = [
    "Case",
    "ExportConfig",
    "ExportResult",
    "Exporter",
    "ExtraVariant",
    "ValidationReport",
    "export",
    "export_fp32",
    "render_report",
    "validate",
    "write_bundle",
]
__getattr__, __dir__ = exports(__name__, _WHERE)

if TYPE_CHECKING:
    from quantgate.export.config import ExportConfig, Exporter
    from quantgate.export.pipeline import ExportResult, export, export_fp32
    from quantgate.export.validation import Case, ValidationReport, validate
    from quantgate.export.writer import ExtraVariant, render_report, write_bundle
