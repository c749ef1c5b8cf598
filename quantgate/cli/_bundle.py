"""What `export` and `inspect` print of a bundle's export: the notes on how it was made, and
the fusions ONNX Runtime made."""

from __future__ import annotations


def export_notes(export: dict) -> list[str]:
    """The exporters ``--exporter auto`` tried before the one used, and why each failed; the
    values the legacy tracer fixed as constants in the user's code (``tracer_notes``); and
    why the graph is unfused where ONNX Runtime's optimizer failed on it."""
    failed = export.get("optimizer_failed")
    return [
        *(
            f"the {exporter} exporter was passed over: {why}"
            for exporter, _, why in (a.partition(": ") for a in export.get("attempts", ()))
        ),
        *(
            f"the legacy tracer fixed a value computed from a tensor at {note}"
            for note in export.get("tracer_notes", ())
        ),
        *([f"unfused: {failed}"] if failed else []),
    ]


def fusions(export: dict) -> str:
    """The fusions ONNX Runtime made, with their counts: "Attention 6, BiasGelu 6"."""
    return ", ".join(f"{k} {v}" for k, v in export.get("fusions", {}).items()) or "none"
