"""The report's reading of a search's revert pass (``search.json``'s ``revert`` block, :mod:`lowbit.search_revert`).

The pass's candidates live under ``search-<mode>/revert/`` and are no rows of the report
(:func:`lowbit.report_inputs.find_metrics` leaves that folder out): they are tries of one search, summarised here.
The block is used only when

* its arithmetic holds: ``k`` is the number of final float nodes, ``gained`` is ``start_k - k``, each try's
  ``kept`` is its loss plus margin within the search's budget, and the final set is the start set less the kept
  tries' nodes;
* the final set's files are those it names: the model and the metrics of its last kept try, by sha256, the metrics
  record with the AP the block gives; the same for each confirmation attempt, which names a kept try of the same
  K and model, and for the kept try that was confirmed;
* each confirmation attempt scored the images of the search's confirmation baseline (the same image ids), its ΔAP
  is its AP less that baseline's, ``within_budget`` is its loss within the budget, and the attempts stop at the
  first within the budget, which is the confirmed set.

Anything else drops the block (the search stands) with the reason in report.json's ``dropped``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.errors import UserError
from lowbit.report_inputs import Hasher
from lowbit.report_search_check import ap_close
from lowbit.runs import resolve_repo_path

__all__ = ["revert_summary"]


def _fail(path: Path, text: str) -> None:
    raise UserError(f"{path}: revert pass: {text}", flag=str(path))


def _checked_files(path: Path, entry: dict, hasher: Hasher, what: str) -> dict:
    """The metrics record of an entry whose model and metrics files still have the sha256 it names."""
    for key in ("model", "metrics"):
        file = resolve_repo_path(entry[f"{key}_path"])
        if not file.is_file():
            _fail(path, f"the {what}'s {key} file {entry[f'{key}_path']} is missing")
        if hasher(file) != entry[f"{key}_sha256"]:
            _fail(path, f"the {what}'s {key} file {entry[f'{key}_path']} changed since the search (sha256)")
    scored = records.read_record(resolve_repo_path(entry["metrics_path"]), "metrics", flag=str(path))
    if not ap_close(entry["ap"], float(scored["metrics"]["map50_95"]) * 100.0):
        _fail(path, f"the {what}'s AP {entry['ap']} is not the {scored['metrics']['map50_95'] * 100:.4f} it scored")
    if scored["model"]["sha256"] != entry["model_sha256"]:
        _fail(path, f"the {what}'s metrics scored another model than {entry['model_path']}")
    return scored


def _check(path: Path, data: dict, hasher: Hasher) -> dict[str, Any]:
    block, budget = data["revert"], float(data["budget_ap"])
    tries, nodes, start_k = block["tries"], list(block["nodes"]), int(block["start_k"])
    if int(block["k"]) != len(nodes) or int(block["gained"]) != start_k - len(nodes):
        _fail(path, f"k={block['k']}, gained={block['gained']} do not fit {len(nodes)} final of {start_k} nodes")
    for i, t in enumerate(tries, start=1):
        if bool(t["kept"]) != (float(t["delta"]) + float(t.get("margin") or 0.0) <= budget):
            _fail(path, f"try {i} says kept={t['kept']} for a loss of {t['delta']} AP against a budget of {budget}")
    kept = [t for t in tries if t["kept"]]
    if len(kept) != start_k - len(nodes) or any(t["node"] in nodes for t in kept):
        _fail(path, "its final float nodes are not its start less the nodes its kept tries put back")
    final = kept[-1] if kept else None
    if final is not None:
        if int(final["k"]) != len(nodes):
            _fail(path, f"its last kept try has {final['k']} float nodes, its final set {len(nodes)}")
        _checked_files(path, final, hasher, "last kept try")
    conf = block.get("confirmation")
    confirmation, row = None, None
    if conf is not None:
        confirmation, row = _check_confirmation(path, data, conf, tries, hasher)
    return {
        "start_k": start_k,
        "k": len(nodes),
        "gained": start_k - len(nodes),
        "tries": len(tries),
        "nodes": nodes,
        "reverted": [t["node"] for t in kept],
        "search_delta_ap": None if final is None else 0.0 - float(final["delta"]) + 0.0,
        "search_std_error": None if final is None else final.get("std_error"),
        "confirmation": confirmation,
        "confirmed": confirmation is not None and confirmation["confirmed"],
        "confirmed_k": None if row is None else int(row["k"]),
        "confirmed_nodes": None if row is None else list(conf["nodes"]),
        "metrics_path": None if row is None else row["metrics_path"],  # the confirmed set on the search slice
        "confirmed_search_delta_ap": None if row is None else 0.0 - float(row["delta"]) + 0.0,
    }


def _check_confirmation(path: Path, data: dict, conf: dict, tries: list[dict], hasher: Hasher) -> tuple[dict, dict]:
    """The checked confirmation attempts, and the kept try whose set was confirmed (None when none was)."""
    budget = float(data["budget_ap"])
    kept_by_try = {i: t for i, t in enumerate(tries, start=1) if t["kept"]}
    baseline = (data.get("confirmation") or {}).get("baseline_metrics")
    if baseline is None:
        _fail(path, "its confirmation has no confirmation baseline in the search")
    reference = records.read_record(resolve_repo_path(baseline), "metrics", flag=str(path))
    base_ap = float(reference["metrics"]["map50_95"]) * 100.0
    attempts = []
    for a in conf["attempts"]:
        t = kept_by_try.get(int(a["try"]))
        if t is None or int(a["k"]) != int(t["k"]) or a["model_sha256"] != t["model_sha256"]:
            _fail(path, f"its confirmation of K={a['k']} names try {a['try']}, which kept no such set")
        scored = _checked_files(path, a, hasher, f"confirmation of K={a['k']}")
        if scored["dataset"]["image_ids"] != reference["dataset"]["image_ids"]:
            _fail(path, f"its confirmation of K={a['k']} scored other images than the confirmation baseline {baseline}")
        pd = a["paired_delta"]
        if not ap_close(pd["delta_ap"], float(a["ap"]) - base_ap):
            _fail(path, f"its confirmation ΔAP {pd['delta_ap']} is not its AP less the confirmation baseline's")
        if bool(a["within_budget"]) != (-float(pd["delta_ap"]) <= budget):
            _fail(path, f"its confirmation says within_budget={a['within_budget']} for ΔAP {pd['delta_ap']}")
        attempts.append(
            {
                "k": int(a["k"]),
                "try": int(a["try"]),
                **{key: pd[key] for key in ("delta_ap", "ci_low", "ci_high", "std_error", "n_images")},
                "within_budget": bool(a["within_budget"]),
                "model_path": a["model_path"],
                "metrics_path": a["metrics_path"],
            }
        )
    confirmed = bool(conf["confirmed"])
    if any(a["within_budget"] for a in attempts[:-1]) or confirmed != bool(attempts and attempts[-1]["within_budget"]):
        _fail(path, f"confirmed={conf['confirmed']} does not follow from its confirmation attempts")
    row = None
    if confirmed:
        row = kept_by_try[attempts[-1]["try"]]
        if int(conf["k"]) != attempts[-1]["k"]:
            _fail(path, f"its confirmed K={conf['k']} is not the K of its last attempt ({attempts[-1]['k']})")
        _checked_files(path, row, hasher, f"kept set K={row['k']}")
        last = attempts[-1]["try"]
        later = {t["node"] for i, t in enumerate(tries, start=1) if t["kept"] and i > last}
        if sorted(conf["nodes"]) != sorted(set(data["revert"]["nodes"]) | later) or len(conf["nodes"]) != row["k"]:
            _fail(path, f"its confirmed nodes are not the set it had kept after try {last}")
    summary = {"step": conf["step"], "rule": conf["rule"], "attempts": attempts, "k": conf["k"], "confirmed": confirmed}
    return summary, row


def revert_summary(path: Path, data: dict, hasher: Hasher) -> dict[str, Any] | None:
    """report.json's ``revert`` of the search at ``path`` (None when it ran no revert pass); UserError with the
    reason when the block fails a check (see the module docstring)."""
    if not data.get("revert"):
        return None
    try:
        return _check(path, data, hasher)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: revert pass is incomplete ({type(e).__name__}: {e})", flag=str(path)) from e
