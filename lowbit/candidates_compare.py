"""Full-model edit against ModelOpt re-quantization: both builds of each scheme's candidate evaluated side by side
(``materialize_yolov10m_lowbit_candidates.py --compare-requantize``), to show whether removing Q/DQ pairs from
the calibrated full model matches ModelOpt's ``nodes_to_exclude`` (:mod:`lowbit.candidates_build`)."""

from __future__ import annotations

from lowbit.candidates import CandidateStore
from lowbit.candidates_materialize import MaterializeSettings, check_materialize_settings
from lowbit.errors import UserError
from lowbit.schemes import find_schemes

__all__ = ["compare_builds", "compare_requantize", "compare_table"]


def compare_builds(full: CandidateStore, requant: CandidateStore, nodes_by_k: dict[int, list[str]]) -> list[dict]:
    """Evaluate both builds of each ``{K: float nodes}``; rows ``{k, ap_full_model, ap_requantize, diff_ap}``
    (AP points; ``diff_ap`` = full-model edit minus re-quantization)."""
    rows = []
    for k in sorted(nodes_by_k):
        a, b = full.evaluate(nodes_by_k[k]), requant.evaluate(nodes_by_k[k])
        rows.append(
            {
                "k": k,
                "ap_full_model": a.ap,
                "ap_requantize": b.ap,
                "diff_ap": a.ap - b.ap,
                "full_model_metrics": str(a.metrics_path),
                "requantize_metrics": str(b.metrics_path),
            }
        )
    return rows


def compare_table(rows: list[dict], tolerance_ap: float = 0.05) -> str:
    """Markdown table of :func:`compare_builds` rows, with whether each K agrees within ``tolerance_ap``."""
    lines = [
        "| K | AP full-model edit | AP ModelOpt re-quantization | diff (AP) | within tolerance |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        ok = "yes" if abs(r["diff_ap"]) <= tolerance_ap else "no"
        lines.append(f"| {r['k']} | {r['ap_full_model']:.2f} | {r['ap_requantize']:.2f} | {r['diff_ap']:+.2f} | {ok} |")
    return "\n".join(lines) + f"\n\ntolerance: {tolerance_ap:g} AP\n"


def compare_requantize(settings: MaterializeSettings) -> list[dict]:
    """Both builds of every scheme K (``settings.ks``), evaluated into ``settings.compare_dir`` (holding it and
    ``run_root``); :func:`compare_builds` rows.

    Needs ``settings.from_full_model`` (the calibrated full Q/DQ model) and the evaluation settings. Both builds
    are evaluated as the budget search evaluates its candidates (:class:`lowbit.candidates.CandidateStore`).
    """
    from lowbit.run_lock import hold_run_folder

    with hold_run_folder(settings.run_root, "--run-root"), hold_run_folder(settings.compare_dir, "--compare-dir"):
        if not settings.from_full_model:
            raise UserError(
                "--compare-requantize needs --from-full-model (the calibrated full Q/DQ model)",
                flag="--from-full-model",
            )
        ks = check_materialize_settings(settings)
        schemes = find_schemes(settings.schemes_dir, ks, False, "--schemes-dir")
        stem, mode, full_model = settings.onnx_path.stem, settings.quant_mode, settings.from_full_model
        full = CandidateStore(settings.compare_dir, mode, stem, full_model, settings.evaluation, "full")
        requantize, evaluation = settings.quantizer, settings.evaluation
        again = CandidateStore(
            settings.compare_dir, mode, stem, full_model, evaluation, "requantize", requantize, suffix="-requant"
        )
        return compare_builds(full, again, {s.k: list(s.nodes_to_exclude) for s in schemes})
