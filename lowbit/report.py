"""Makes the comparison report of one model's evaluated variants (:func:`make_report`): report.md, report.json,
pareto.png and search-curves.png in the report folder, from what the card's steps already wrote.

Nothing is re-measured except, optionally, TensorRT engines. The steps, one module each:

1. :mod:`lowbit.report_collect` reads every evaluation (one :class:`~lowbit.report_variant.Variant` per
   ``metrics.json``) and budget search under the run dirs, and keeps those that belong to the FP32 baseline;
   the checks of what it may use are in :mod:`lowbit.report_inputs` (the rest is listed under "Dropped");
2. :mod:`lowbit.report_costs` times a TensorRT engine per variant (when ``trtexec`` exists) and reads the
   low-precision share of each model's MACs; :mod:`lowbit.report_intervals` computes the paired bootstrap interval
   of every ΔAP from the detections beside each evaluation (``n_boot`` replicates, timed);
3. :mod:`lowbit.report_json` assembles report.json (its keys are documented there), applying the policy of
   :mod:`lowbit.report_recommend`;
4. :mod:`lowbit.report_markdown` and :mod:`lowbit.report_plots` render report.md, the console summary and the
   figures from that document.

Every record read and written here is described in docs/records.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit import trt
from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging
from lowbit.report_collect import Collected, collect_variants
from lowbit.report_costs import measure_tensorrt
from lowbit.report_intervals import DEFAULT_N_BOOT, compute_intervals
from lowbit.report_json import build_report, search_summary
from lowbit.report_markdown import report_markdown, search_markdown, summary_text
from lowbit.report_plots import PARETO_PLOT, SEARCH_PLOT, plot_pareto, plot_search_curves
from lowbit.report_recommend import DEFAULT_BUDGET_AP, DEFAULT_LATENCY_TIE_PCT
from lowbit.run_lock import hold_run_folder
from lowbit.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, manifest_run, resolve_repo_path

__all__ = [
    "OUTPUT_FILES",
    "SCRIPT",
    "ReportResult",
    "ReportSettings",
    "make_report",
    "plot_search_curves",  # re-exported: the budget search's tests draw and render a search summary from here
    "search_markdown",
    "search_summary",
    "write_report",
]

SCRIPT = "make_lowbit_report.py"  # the script named in report.manifest.json
OUTPUT_FILES = ("report.json", "report.md", PARETO_PLOT, SEARCH_PLOT)
log = get_logger("make_report")  # the report step's log name, as report.log has always shown it


@dataclass(frozen=True)
class ReportSettings:
    """What to report on and how; one field per flag of ``make_lowbit_report.py``, named and ordered as its
    ``--help`` lists them (report.manifest.json's ``args`` is this record)."""

    run_dir: list[Path]  # --run-dir: run dirs holding */metrics.json evaluations (one model, one image set)
    out_dir: Path | None = None  # --out-dir: where the report goes; None means the first run dir
    budget_ap: float = DEFAULT_BUDGET_AP  # --budget-ap: largest accepted mAP50-95 loss vs FP32, AP points (> 0)
    data_root: Path | None = None  # --data-root: dataset whose annotation file must be the one the run was scored on
    latency_tie_pct: float = DEFAULT_LATENCY_TIE_PCT  # --latency-tie-pct: latencies this close (%) tie
    tensorrt: str = "auto"  # --tensorrt: "auto" (time engines when trtexec exists) | "off"
    trtexec: Path | None = None  # --trtexec: None means PATH, then /usr/src/tensorrt/bin/trtexec
    trt_qdq_mode: str = "stronglyTyped"  # --trt-qdq-mode: one of lowbit.trt.QDQ_MODES
    trt_iterations: int = trt.DEFAULT_ITERATIONS  # --trt-iterations: timed trtexec inferences (minimum)
    trt_warmup_ms: int = trt.DEFAULT_WARMUP_MS  # --trt-warmup-ms: trtexec warm-up, milliseconds
    ci_replicates: int = DEFAULT_N_BOOT  # --ci-replicates: bootstrap replicates per ΔAP interval (0: none)
    overwrite: bool = False  # --overwrite: replace an existing report in the report folder
    verbose: bool = False  # --verbose: debug logging on the console

    def check(self) -> None:
        """Raise UserError naming the flag of a setting that cannot be used (before anything is read)."""
        if not self.latency_tie_pct >= 0:
            raise UserError(f"--latency-tie-pct must be >= 0, got {self.latency_tie_pct}", flag="--latency-tie-pct")
        if self.trt_iterations < 1:
            raise UserError(f"--trt-iterations must be >= 1, got {self.trt_iterations}", flag="--trt-iterations")
        if self.trt_warmup_ms < 0:
            raise UserError(f"--trt-warmup-ms must be >= 0, got {self.trt_warmup_ms}", flag="--trt-warmup-ms")
        if self.ci_replicates != 0 and self.ci_replicates < 2:
            raise UserError(
                f"--ci-replicates must be 0 (no intervals) or >= 2, got {self.ci_replicates}", flag="--ci-replicates"
            )
        if self.trtexec is not None and trt.find_trtexec(self.trtexec) is None:
            raise UserError(f"--trtexec: {self.trtexec} is not an executable file", flag="--trtexec")


@dataclass(frozen=True)
class ReportResult:
    """A written report: its folder and its document (report.json's content)."""

    out_dir: Path
    report: dict

    @property
    def summary(self) -> str:
        """The console summary (:func:`lowbit.report_markdown.summary_text`)."""
        return summary_text(self.report, self.out_dir)


def write_report(
    collected: Collected,
    settings: ReportSettings,
    argv: list[str] | None,
    out_dir: Path,
) -> dict:
    """report.json, report.md and the plots in ``out_dir`` (held by this process); returns the report document.

    Raises:
        UserError: ``out_dir`` already holds a report and ``settings.overwrite`` is off.
    """
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not settings.overwrite:
        raise UserError(
            f"--out-dir: {out_dir} already holds {', '.join(existing)}; pass --overwrite to replace them",
            flag="--overwrite",
        )
    setup_logging(out_dir / "report.log", settings.verbose)
    for d in collected.dropped:
        log.warning("left out %s: %s", d["path"], d["reason"])
    with manifest_run(out_dir / "report.manifest.json", SCRIPT, asdict(settings), argv, kind="report") as manifest:
        for name in OUTPUT_FILES:  # --overwrite: a failed rebuild must not leave the old report looking current
            (out_dir / name).unlink(missing_ok=True)
        for path, digest in collected.provenance["records"].items():
            manifest.add_input(path, digest)
        log.info("%d evaluations under %s", len(collected.variants), ", ".join(collected.run_dirs))
        tensorrt = measure_tensorrt(
            collected.variants,
            out_dir,
            mode=settings.tensorrt,
            trtexec=settings.trtexec,
            qdq_mode=settings.trt_qdq_mode,
            iterations=settings.trt_iterations,
            warmup_ms=settings.trt_warmup_ms,
        )
        confirm_slices = [
            (s.confirmation.baseline, [a.evaluation for a in s.confirmation.attempts])
            for s in collected.searches
            if s.confirmation is not None
        ]
        intervals = compute_intervals(
            collected.baseline,
            collected.variants,
            confirm_slices,
            collected.ann_file,
            settings.ci_replicates,
            cache_root=resolve_repo_path(settings.run_dir[0]),
        )
        report = build_report(collected, settings.budget_ap, settings.latency_tie_pct, tensorrt, intervals)
        atomic_write_bytes(out_dir / PARETO_PLOT, plot_pareto(report))
        if report["search"]:
            atomic_write_bytes(out_dir / SEARCH_PLOT, plot_search_curves(report))
            manifest.add_output(SEARCH_PLOT, out_dir / SEARCH_PLOT)
        atomic_write_text(out_dir / "report.md", report_markdown(report))
        atomic_write_json(out_dir / "report.json", report)  # last: its presence means the report is complete
        for name in OUTPUT_FILES[:3]:
            manifest.add_output(name, out_dir / name)
        manifest.update(
            recommended=report["recommended"]["variant"],
            variants=len(report["variants"]),
            dropped=len(report["dropped"]),
            tensorrt_status=report["tensorrt"]["status"],
            ci_replicates=settings.ci_replicates,
            ci_seconds=report["intervals"]["seconds"],
        )
    return report


def make_report(settings: ReportSettings, argv: list[str] | None = None) -> ReportResult:
    """Check ``settings``, read and check every record of the run dirs, then write the report into the report
    folder (``out_dir``, else the first run dir) while holding it.

    Args:
        settings: the flags of ``make_lowbit_report.py``.
        argv: the command line, for report.manifest.json (None: ``sys.argv``).

    Raises:
        UserError: a setting that cannot be used, a run dir that is no directory, an unusable run
            (:func:`lowbit.report_collect.collect_variants`), a report folder held by another process or holding
            a report (without ``overwrite``). Each names the flag or the file.
    """
    settings.check()
    run_dirs = [resolve_repo_path(d) for d in settings.run_dir]
    for given, run_dir in zip(settings.run_dir, run_dirs):
        if not run_dir.is_dir():
            raise UserError(f"--run-dir: {given} is not a directory", flag="--run-dir")
    # every record is read and checked before anything is written
    collected = collect_variants(run_dirs, settings.data_root)
    out_dir = settings.out_dir if settings.out_dir is not None else run_dirs[0]
    with hold_run_folder(out_dir, "--out-dir"):
        report = write_report(collected, settings, argv, out_dir)
    return ReportResult(out_dir, report)
