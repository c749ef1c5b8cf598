"""Write a bundle from an export result, plus any further variants (INT8, FP16) and gates.

This is the only step that touches ``--out``. Everything is staged in a temporary sibling
directory by ``quantgate.bundle.staging`` and renamed into place at the end, so a failure
or a kill at any point leaves the previous bundle (or nothing) at ``out``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantgate.bundle import (
    CPU,
    CUDA,
    MANIFEST,
    REPORT,
    TOKENIZER_DIR,
    Bundle,
    GateResult,
    Manifest,
    Variant,
    sha256_file,
    staging,
    verdict_of,
    verdict_phrase,
    write_manifest,
)
from quantgate.errors import BundleError
from quantgate.export.pipeline import ExportResult
from quantgate.schema import PRECISIONS, printable_name

log = logging.getLogger(__name__)

FP32_FILE = "model.fp32.onnx"


@dataclass(frozen=True)
class ExtraVariant:
    """A further model file for the bundle (INT8, FP16) with the evidence for shipping it."""

    path: Path  # the file to copy in as model.<precision>.onnx
    precision: str  # "int8" or "fp16"
    gates: tuple[GateResult, ...] = ()
    providers: tuple[str, ...] = (CPU,)
    recipe: dict[str, Any] | None = None
    not_for: tuple[str, ...] = ()
    notes: str = ""

    @property
    def verdict(self) -> str:
        return verdict_of(self.gates)


def _bundle_tokenizer(
    extra: dict[str, Any], tmp: Path, max_seq_len: int
) -> tuple[dict[str, Any], list[str]]:
    """Save a Hugging Face model's tokenizer into the bundle and point the manifest at it
    (relative to the bundle): text data then tokenizes wherever the bundle goes, as
    `quantgate gate BUNDLE --eval heldout.jsonl` in another machine's CI. Where its
    tokenizer.json alone tokenizes as transformers does, the manifest records how to run it
    so (``quantgate.tokenizer.check``): `quantgate infer -t` then starts in a tenth of the time.
    Returns the manifest's ``extra`` and report.md's sections: one where transformers reads
    the saved copy otherwise than the model's own tokenizer (``quantgate.tokenizer.examine``)."""
    hf = extra.get("huggingface") or {}
    source = hf.get("tokenizer")
    if not source or not Path(source).is_dir():
        return extra, []
    from transformers import AutoTokenizer

    from quantgate.tokenizer import Examined, examine

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    pad = pad if isinstance(pad := hf.get("pad_token_id"), int) else None
    # It pads as the model and server do. Not where the pad id names an ordinary token (id 0,
    # GPT-2's "!", for a model that names none): transformers reads a token the config names
    # as special back as one, and would split text at every "!". quantgate pads with the
    # manifest's pad id anyway.
    if pad is not None and pad in tokenizer.all_special_ids:
        tokenizer.pad_token_id = pad
    tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    hf = {**hf, "tokenizer": TOKENIZER_DIR}
    try:  # checks of the copy: they say what they find, and never fail the export's work
        examined = examine(tokenizer, tmp / TOKENIZER_DIR, max_seq_len, pad)
    except Exception as e:  # noqa: BLE001
        log.info("the tokenizer could not be checked (%s): its text is read by transformers", e)
        examined = Examined(None, None)
    if examined.settings is not None:
        hf["tokenizers"] = examined.settings.to_dict()
    sections = []
    if (differs := examined.copy_differs) is not None:
        sections.append(
            "## Tokenizer\n\n"
            "The bundle's copy of the model's tokenizer, read back by transformers, tokenizes "
            f"otherwise than the model's own on {differs}. The gates measured text as the "
            "model's own tokenizer reads it; text sent with this bundle (`quantgate infer -t`, "
            "`quantgate gate --eval`) is read by the copy. Tokenize such text with the model's "
            "own tokenizer and send its arrays, or check the two on your own texts.\n"
        )
    return {**extra, "huggingface": hf}, sections


def write_bundle(
    result: ExportResult,
    out: str | Path,
    *,
    variants: Sequence[ExtraVariant] = (),
    calibration: dict[str, Any] | None = None,
    report_sections: Sequence[str] = (),
    files: Sequence[Path] = (),
    name: str | None = None,
    force: bool = False,
) -> Bundle:
    """Write ``result`` (and ``variants``) as a bundle at ``out``; return it, loaded and verified.

    ``report_sections`` are Markdown blocks appended to report.md (the gates' tables);
    ``files`` are copied in beside it under their own names (the candidates plot).
    """
    out = Path(out)
    if not result.onnx.is_file():
        raise BundleError(f"{result.onnx} is gone; write_bundle needs the export's workdir")
    name = name or out.absolute().name
    if not printable_name(name):
        raise BundleError(
            f"bundle name {name!r} holds a control character, line break or direction "
            "override, which would reach log lines and terminals as it is: name it otherwise "
            "(--name)"
        )
    seen = {"fp32"}
    for v in variants:
        if v.precision not in PRECISIONS or v.precision in seen:
            raise BundleError(
                f"variant precision {v.precision!r} is invalid or repeated; each of "
                f"{PRECISIONS} may appear once and fp32 is the export itself"
            )
        seen.add(v.precision)
    with staging(out, force=force) as tmp:
        fp32 = _copy_verified(result.onnx, tmp / FP32_FILE, result.sha256)
        entries = [_fp32_variant(result, fp32)]
        for v in variants:
            file = tmp / f"model.{v.precision}.onnx"
            shutil.copyfile(v.path, file)
            entries.append(
                Variant(
                    file=file.name,
                    precision=v.precision,
                    sha256=sha256_file(file),
                    providers=v.providers,
                    recipe=v.recipe,
                    gates=v.gates,
                    verdict=v.verdict,
                    not_for=v.not_for,
                    notes=v.notes,
                )
            )
        for src, entry in zip((result.onnx, *(v.path for v in variants)), entries, strict=True):
            _copy_external_data(src, tmp, entry.file)
        extra, tokenizer_sections = _bundle_tokenizer(result.extra, tmp, result.max_seq_len)
        report_sections = [*report_sections, *tokenizer_sections]
        taken = {MANIFEST, REPORT, *(e.file for e in entries)}
        for f in files:
            if Path(f).name in taken or (tmp / Path(f).name).exists():
                raise BundleError(
                    f"{f}: a bundle file of that name exists already; rename the file to add"
                )
            shutil.copyfile(f, tmp / Path(f).name)
        manifest = Manifest(
            name=name,
            task=result.task,
            inputs=result.inputs,
            outputs=result.outputs,
            variants=tuple(entries),
            opset=result.opset,
            source=result.source,
            tools=result.tools,
            calibration=calibration,
            export=result.export_record(),
            extra=extra,
            files=_other_files(tmp, taken),
        )
        write_manifest(tmp, manifest)
        (tmp / REPORT).write_text(render_report(manifest, report_sections))
    log.info("wrote bundle %s (%s)", out, ", ".join(v.file for v in manifest.variants))
    from quantgate.bundle import load

    return load(out)


def _other_files(tmp: Path, skip: set[str]) -> dict[str, str]:
    """Every file in the staged bundle but ``skip`` (the manifest, report.md, the variants),
    by its path in the bundle -> sha256: the tokenizer, external weights, the plot."""
    return {
        p.relative_to(tmp).as_posix(): sha256_file(p)
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.relative_to(tmp).as_posix() not in skip
    }


def _copy_external_data(model: Path, tmp: Path, name: str) -> None:
    """Copy the files that hold ``model``'s weights outside it (ONNX external data, needed
    past 2 GB) into the bundle beside it, under the names the model refers to them by."""
    from quantgate import onnxfiles

    for location in onnxfiles.external_locations(model):
        inside = Path(location)
        if inside.is_absolute() or ".." in inside.parts or location in (MANIFEST, REPORT):
            raise BundleError(
                f"{model} keeps weights in {location}, outside its own directory; save the "
                "model with its external data beside it (onnx.save_model(..., "
                "save_as_external_data=True, location=NAME))"
            )
        src, dst = model.parent / inside, tmp / inside
        if not src.is_file():
            raise BundleError(
                f"{model} keeps weights in {location}, and {src} is missing; put the file "
                "back beside the model"
            )
        if dst.exists():
            if sha256_file(dst) == sha256_file(src):
                continue  # two variants sharing one weights file
            raise BundleError(
                f"{name} and another variant keep different weights under one name, "
                f"{location}; save one of them with another location"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _copy_verified(src: Path, dst: Path, sha256: str) -> Path:
    shutil.copyfile(src, dst)
    got = sha256_file(dst)
    if got != sha256:
        raise BundleError(
            f"{src.name} changed after validation (sha256 {got[:12]}..., validated "
            f"{sha256[:12]}...); re-run the export"
        )
    return dst


def _fp32_variant(result: ExportResult, file: Path) -> Variant:
    """The FP32 reference; its gates are the validation's rule, per output vs PyTorch: every
    |ort - torch| <= atol + rtol * |torch|, recorded as the largest ratio of the two (<= 1)."""
    v = result.validation
    gates = tuple(
        GateResult(
            name=f"tolerance_used:{output}",
            value=used,
            threshold=1.0,
            op="<=",
            passed=used <= 1.0,
            detail=f"max |ort - torch| / (atol {v.atol:g} + rtol {v.rtol:g} * |torch|) over "
            f"{len(v.cases)} shapes; max abs diff {v.max_abs_diff[output]:.3g}",
        )
        for output, used in v.tolerance_used.items()
    )
    return Variant(
        file=file.name,
        precision="fp32",
        sha256=result.sha256,
        providers=(CPU, CUDA),
        gates=gates,
        notes=f"{result.exporter.value} exporter, opset {result.opset}"
        + (", ONNX Runtime transformer fusions" if result.fusions else ""),
    )


def render_report(manifest: Manifest, sections: Sequence[str] = ()) -> str:
    """report.md: what was exported, how it validated, what fused, and any gate sections."""
    e = manifest.export
    lines = [
        f"# {manifest.name}",
        "",
        f"Task **{manifest.task}**, exported from {manifest.source.get('kind')} "
        f"`{manifest.source.get('spec')}` with the {e.get('exporter')} exporter at opset "
        f"{manifest.opset}. {verdict_phrase(manifest)}",
        "",
        "| tensor | dtype | dims |",
        "|---|---|---|",
        *(
            f"| {'in' if t in manifest.inputs else 'out'}: `{t.name}` | {t.dtype} | "
            f"{', '.join(map(str, t.dims))} |"
            for t in (*manifest.inputs, *manifest.outputs)
        ),
        "",
    ]
    if (val := e.get("validation")) is not None:
        outs = list(val["max_abs_diff"])
        lines += [
            "## Validation: ONNX Runtime vs PyTorch",
            "",
            f"Real samples: {e.get('samples')}. Tolerance: atol {val['atol']:g}, "
            f"rtol {val['rtol']:g}. Max abs diff per output:",
            "",
            "| shape | batch | sequence | padded rows | " + " | ".join(outs) + " |",
            "|---|---|---|---|" + "---|" * len(outs),
            *(
                f"| {c['case']} | {c['batch']} | {c['sequence']} | {c['padded_rows']} | "
                + " | ".join(f"{c['max_abs_diff'].get(o, float('nan')):.2e}" for o in outs)
                + " |"
                for c in val["cases"]
            ),
            "",
        ]
        if notes := e.get("tracer_notes"):
            lines += [
                "Where the legacy exporter's tracer fixed a value computed from a tensor as a "
                "constant (the graph holds the example batch's value there; the shapes above "
                "are all that was checked):",
                "",
                *(f"- {n}" for n in notes),
                "",
            ]
        if attempts := e.get("attempts"):
            lines += ["Exporters passed over:", "", *(f"- {a}" for a in attempts), ""]
    if "fusion_summary" in e:
        fused = ", ".join(f"{k} {v}" for k, v in e["fusions"].items()) or "none"
        missing = [k for k, v in e["fusion_summary"].items() if not v]
        lines += [
            "## Graph optimization",
            "",
            f"ONNX Runtime transformer fusions: {fused}."
            + (f" Not fused: {', '.join(missing)}." if missing and e.get("optimized") else "")
            + (
                ""
                if e.get("optimized")
                else f" The optimizer failed, so the graph ships unfused: {e['optimizer_failed']}"
                if e.get("optimizer_failed")
                else " (optimization was off)"
            ),
            "",
        ]
    lines += [
        "## Variants",
        "",
        "| file | precision | verdict | sha256 |",
        "|---|---|---|---|",
        *(
            f"| {v.file} | {v.precision} | {v.verdict} | `{v.sha256[:12]}` |"
            for v in manifest.variants
        ),
        "",
    ]
    return "\n".join([*lines, *sections]).rstrip() + "\n"


__all__ = ["ExtraVariant", "FP32_FILE", "MANIFEST", "render_report", "write_bundle"]
