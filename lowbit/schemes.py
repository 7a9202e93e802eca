"""Exclusion schemes: which ONNX nodes stay in float for a candidate, built from a layer-sensitivity ranking.

A scheme is one JSON file, ``scheme_k{K}.json`` (or ``scheme_k{K}_random{SEED}.json`` for a random
control), with the keys:

* ``k``: number of excluded nodes (int >= 0);
* ``nodes_to_exclude``: exact ONNX node names, best-ranked first, ``k`` of them, no repeats;
* ``layers``: the report layer names they came from, in the same order;
* ``report``, ``report_sha256``: the layer-sensitivity report ranked;
* ``onnx_path``, ``onnx_sha256``: the graph the node names belong to;
* ``precision``: the report's precision (``int8`` | ``fp8``);
* ``random_seed``: only in random controls.

A folder of schemes also holds ``schemes_summary.json`` (matched and unmatched report layers, see
:func:`build_schemes`), ``manifest.json`` and a log.

Mapping: a report layer maps through :class:`lowbit.sensitivity_onnx.NodeMatcher` (its ``onnx_node``,
its weight initializer, or the export's naming convention). When too many of the top layers map
nowhere, the report and the graph do not share names or weights and :func:`check_ks` refuses, rather
than writing schemes that exclude the wrong layers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.runs import atomic_write_json

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_MAX_UNMATCHED_FRAC",
    "LOG_FILE",
    "SUMMARY_FILE",
    "LayerMapping",
    "Scheme",
    "SchemesResult",
    "build_schemes",
    "candidate_tag",
    "check_k_list",
    "check_ks",
    "check_settings",
    "find_schemes",
    "load_scheme",
    "map_layers",
    "previous_files",
    "random_scheme",
    "scheme_path",
    "seeded_sample",
    "summarize",
    "top_k_scheme",
    "validate_scheme",
    "write_scheme",
]

log = get_logger("schemes")

SUMMARY_FILE = "schemes_summary.json"
LOG_FILE = "make_yolov10m_candidate_schemes.log"
DEFAULT_KS = (0, 5, 10, 20)
DEFAULT_MAX_UNMATCHED_FRAC = 0.2  # share of the top max(K) report layers allowed to map to no node
_SCHEME_NAME = re.compile(r"^scheme_k(\d+)(?:_random(\d+))?\.json$")


def candidate_tag(k: int, random_seed: int | None = None) -> str:
    """``k5`` or ``k5_random7``: how a scheme file, a candidate and its folders name K and a random control's seed."""
    return f"k{k}" + ("" if random_seed is None else f"_random{random_seed}")


def seeded_sample(n: int, k: int, seed: int) -> list[int]:
    """``k`` of the indices ``0..n-1``, drawn without replacement with ``numpy.random.default_rng(seed)``, ascending.

    The one draw of every random control (scheme files and the search's), so a seed picks the same nodes of the
    same pool wherever it is used.
    """
    import numpy as np

    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


@dataclass
class LayerMapping:
    """Report layers in rank order, split by where they landed on the graph.

    ``matched`` entries: ``rank``, ``name``, ``onnx_node``, ``via``; ``unmatched``: ``rank``, ``name``,
    ``reason``; ``duplicates``: layers whose node a better-ranked layer already took (``rank``, ``name``,
    ``onnx_node``, ``taken_by``), so that no node is excluded twice.
    """

    matched: list[dict] = field(default_factory=list)
    unmatched: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)

    def vias(self) -> dict[str, int]:
        """How many matched layers mapped by each route (``onnx_node``, ``weight``, ``name_convention``)."""
        counts: dict[str, int] = {}
        for m in self.matched:
            counts[m["via"]] = counts.get(m["via"], 0) + 1
        return counts


@dataclass
class Scheme:
    """A validated scheme file: ``k`` nodes to keep in float, and where it came from (``data``: every key)."""

    path: Path
    k: int
    nodes_to_exclude: list[str]
    random_seed: int | None
    data: dict[str, Any]

    @property
    def tag(self) -> str:
        """``k5`` or ``k5_random7``: the candidate's name suffix."""
        return candidate_tag(self.k, self.random_seed)


@dataclass
class SchemesResult:
    """What :func:`build_schemes` wrote: ``schemes`` (K -> path), ``random`` (K -> path), the summary."""

    schemes: dict[int, Path]
    random: dict[int, Path]
    summary: dict[str, Any]
    summary_path: Path


# ----------------------------------------------------------------------------------------------------------------------
# mapping and checks


def map_layers(report: dict, matcher) -> LayerMapping:
    """Map every report layer (rank order) to a node of the matcher's graph."""
    mapping, claimed = LayerMapping(), {}
    for layer in report["layers"]:
        match = matcher.match(layer)
        entry = {"rank": layer["rank"], "name": layer["name"]}
        if match.node is None:
            mapping.unmatched.append({**entry, "reason": match.reason})
        elif match.node in claimed:
            mapping.duplicates.append({**entry, "onnx_node": match.node, "taken_by": claimed[match.node]})
        else:
            claimed[match.node] = layer["name"]
            mapping.matched.append({**entry, "onnx_node": match.node, "via": match.via})
    return mapping


def check_k_list(ks: list[int], flag: str = "--k") -> list[int]:
    """A list of Ks (``--k``, ``--ks``): at least one, each >= 0; returns them sorted, without repeats."""
    if not ks:
        raise UserError(f"{flag} needs at least one value", flag=flag)
    if any(k < 0 for k in ks):
        raise UserError(f"{flag} values must be >= 0, got {ks}", flag=flag)
    return sorted(set(ks))


def check_settings(ks: list[int], max_unmatched_frac: float) -> list[int]:
    """Validate ``--k`` and ``--max-unmatched-frac`` before any file is read; returns the sorted unique Ks."""
    ks = check_k_list(ks, "--k")
    if not 0.0 <= max_unmatched_frac <= 1.0:
        raise UserError(
            f"--max-unmatched-frac must be between 0 and 1, got {max_unmatched_frac}", flag="--max-unmatched-frac"
        )
    return ks


def check_ks(ks: list[int], report: dict, mapping: LayerMapping, max_frac: float, report_path: Path) -> None:
    """K within the report, enough mapped layers, and not too many unmatched among the top max(K)."""
    n_layers = len(report["layers"])
    too_big = [k for k in ks if k > n_layers]
    if too_big:
        raise UserError(f"--k {max(too_big)}: {report_path} ranks only {n_layers} layers", flag="--k")
    top = max(ks)
    if top == 0:
        return
    missing = [u for u in mapping.unmatched if u["rank"] <= top]
    if len(missing) > max_frac * top:
        shown = "; ".join(f"#{u['rank']} {u['name']}: {u['reason']}" for u in missing[:3])
        raise UserError(
            f"{len(missing)} of the top {top} layers of {report_path} map to no node of --onnx-path "
            f"(more than --max-unmatched-frac {max_frac:g}): the report and the ONNX graph do not share names or "
            f"weights. First: {shown}. Score this graph with onnx_layer_sensitivity.py, or pass the ONNX the "
            "report was made for",
            flag="--max-unmatched-frac",
        )
    if top > len(mapping.matched):
        raise UserError(
            f"--k {top}: only {len(mapping.matched)} layers of {report_path} map to nodes of --onnx-path", flag="--k"
        )


# ----------------------------------------------------------------------------------------------------------------------
# building


def top_k_scheme(mapping: LayerMapping, k: int, common: dict[str, Any]) -> dict[str, Any]:
    """The scheme excluding the ``k`` best-ranked mapped layers; ``common`` adds report/graph provenance."""
    chosen = mapping.matched[:k]
    return {
        "k": k,
        "nodes_to_exclude": [m["onnx_node"] for m in chosen],
        "layers": [m["name"] for m in chosen],
        **common,
    }


def random_scheme(mapping: LayerMapping, k: int, seed: int, order: dict[str, int], common: dict) -> dict[str, Any]:
    """``k`` mapped layers drawn at random with ``seed``: a control for the ranking.

    The pool is every mapped layer in graph order (``order``: node name -> position), so a control
    depends only on the seed, K and the graph, not on the report's ranking.
    """
    pool = sorted(mapping.matched, key=lambda m: order.get(m["onnx_node"], 0))
    chosen = [pool[i] for i in seeded_sample(len(pool), k, seed)]
    return {
        "k": k,
        "nodes_to_exclude": [m["onnx_node"] for m in chosen],
        "layers": [m["name"] for m in chosen],
        **common,
        "random_seed": seed,
    }


def scheme_path(out_dir: Path, k: int, random_seed: int | None = None) -> Path:
    """``<out_dir>/scheme_k{K}.json`` or ``scheme_k{K}_random{SEED}.json``."""
    return Path(out_dir) / f"scheme_{candidate_tag(k, random_seed)}.json"


def previous_files(out_dir: Path) -> list[Path]:
    """Files of an earlier run in ``out_dir`` (schemes, random controls, summary, manifest, log)."""
    if not out_dir.is_dir():
        return []
    return sorted(out_dir.glob("scheme_k*.json")) + [
        p for p in (out_dir / SUMMARY_FILE, out_dir / "manifest.json", out_dir / LOG_FILE) if p.exists()
    ]


def summarize(
    ks: list[int],
    report: dict,
    report_path: Path,
    onnx_path: Path,
    mapping: LayerMapping,
    max_unmatched_frac: float,
    written: dict[int, Path],
    random_written: dict[int, Path],
    seed: int | None,
) -> dict[str, Any]:
    """``schemes_summary.json``: what was mapped, how, and which files were written."""
    return {
        "ks": ks,
        "report": str(report_path),
        "report_source": report.get("source"),
        "precision": report.get("precision"),
        "onnx_path": str(onnx_path),
        "layers": len(report["layers"]),
        "matched_count": len(mapping.matched),
        "unmatched_count": len(mapping.unmatched),
        "matched_via": mapping.vias(),
        "max_unmatched_frac": max_unmatched_frac,
        "schemes": {str(k): str(p) for k, p in written.items()},
        "random_control": (
            {"seed": seed, "schemes": {str(k): str(p) for k, p in random_written.items()}} if random_written else None
        ),
        "matched": mapping.matched,
        "unmatched": mapping.unmatched,
        "duplicates": mapping.duplicates,
    }


def write_schemes(
    out_dir: Path, ks: list[int], mapping: LayerMapping, common: dict, order: dict[str, int], seed: int | None
) -> tuple[dict[int, Path], dict[int, Path]]:
    """Write one scheme per K (and a random control per K > 0 when ``seed`` is given); returns their paths."""
    written, random_written = {}, {}
    for k in ks:
        scheme = top_k_scheme(mapping, k, common)
        written[k] = write_scheme(scheme_path(out_dir, k), scheme)
        log.info("K=%d: excluding %s", k, ", ".join(scheme["nodes_to_exclude"]) or "nothing")
    if seed is not None:
        for k in (k for k in ks if k > 0):
            scheme = random_scheme(mapping, k, seed, order, common)
            random_written[k] = write_scheme(scheme_path(out_dir, k, seed), scheme)
    return written, random_written


# ----------------------------------------------------------------------------------------------------------------------
# reading and writing scheme files


def validate_scheme(data: Any, path: Path, flag: str) -> Scheme:
    """Check one scheme's content; raise UserError naming ``flag`` (and the file) when it is malformed."""
    if not isinstance(data, dict):
        raise UserError(f"{flag}: {path} is not a scheme (a JSON object with 'k' and 'nodes_to_exclude')", flag=flag)
    k, nodes = data.get("k"), data.get("nodes_to_exclude")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UserError(f"{flag}: {path}: 'k' must be an integer >= 0, got {k!r}", flag=flag)
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
        raise UserError(f"{flag}: {path}: 'nodes_to_exclude' must be a list of node names", flag=flag)
    if len(nodes) != k:
        raise UserError(f"{flag}: {path}: 'k' is {k} but 'nodes_to_exclude' lists {len(nodes)} nodes", flag=flag)
    if len(set(nodes)) != len(nodes):
        raise UserError(f"{flag}: {path}: 'nodes_to_exclude' repeats a node name", flag=flag)
    seed = data.get("random_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"{flag}: {path}: 'random_seed' must be an integer, got {seed!r}", flag=flag)
    return Scheme(path=Path(path), k=k, nodes_to_exclude=list(nodes), random_seed=seed, data=data)


def load_scheme(path: Path, flag: str) -> Scheme:
    """Read and validate a scheme file; a missing, unreadable or malformed one is a UserError naming ``flag``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"{flag}: {path} does not exist (run make_yolov10m_candidate_schemes.py)", flag=flag) from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{flag}: {path} is not a readable JSON file ({e})", flag=flag) from e
    scheme = validate_scheme(data, path, flag)
    named = _SCHEME_NAME.match(path.name)
    if named and int(named.group(1)) != scheme.k:
        raise UserError(f"{flag}: {path} is named for K={named.group(1)} but holds 'k' {scheme.k}", flag=flag)
    if named and named.group(2) is not None:  # a random control: the name carries its seed
        seed = int(named.group(2))
        if scheme.random_seed not in (None, seed):
            raise UserError(
                f"{flag}: {path} is named for seed {seed} but holds 'random_seed' {scheme.random_seed}", flag=flag
            )
        scheme.random_seed = seed
    return scheme


def write_scheme(path: Path, scheme: dict[str, Any]) -> Path:
    """Validate, then write atomically; returns ``path``."""
    validate_scheme(scheme, path, "scheme")
    atomic_write_json(path, scheme)
    return Path(path)


def find_schemes(schemes_dir: Path, ks: list[int], include_random: bool, flag: str = "--schemes-dir") -> list[Scheme]:
    """The validated scheme per K (then its random controls when asked), all read before any work starts."""
    if not schemes_dir.is_dir():
        raise UserError(
            f"{flag}: {schemes_dir} is not a folder of schemes (run make_yolov10m_candidate_schemes.py)", flag=flag
        )
    missing = [scheme_path(schemes_dir, k).name for k in ks if not scheme_path(schemes_dir, k).is_file()]
    if missing:
        raise UserError(
            f"{flag}: {schemes_dir} lacks {', '.join(missing)} (run make_yolov10m_candidate_schemes.py)", flag=flag
        )
    found = []
    for k in ks:
        found.append(load_scheme(scheme_path(schemes_dir, k), flag))
        if include_random and k > 0:
            found += [load_scheme(p, flag) for p in sorted(schemes_dir.glob(f"scheme_k{k}_random*.json"))]
    return found


# ----------------------------------------------------------------------------------------------------------------------
# the whole step


def build_schemes(
    report_path: Path,
    onnx_path: Path,
    out_dir: Path,
    ks: list[int],
    *,
    max_unmatched_frac: float = DEFAULT_MAX_UNMATCHED_FRAC,
    random_seed: int | None = None,
    overwrite: bool = False,
    manifest_args: dict | None = None,
    argv: list[str] | None = None,
) -> SchemesResult:
    """Map ``report_path``'s ranking onto ``onnx_path`` and write one scheme per K into ``out_dir``.

    Everything is checked before the folder is touched: the Ks, the report, the graph, the mapping
    (:func:`check_ks`), and earlier results (refused unless ``overwrite``; with it, every earlier scheme
    is removed so the folder holds one consistent set).

    Raises:
        UserError naming the flag (``--k``, ``--report-json``, ``--onnx-path``, ``--out-dir``, ...).
    """
    from lowbit.logs import setup_logging
    from lowbit.onnx_stats import load_model_proto
    from lowbit.runs import manifest_run
    from lowbit.sensitivity_onnx import NodeMatcher
    from lowbit.sensitivity_report import load_report

    ks = check_settings(ks, max_unmatched_frac)
    report = load_report(report_path, "--report-json")
    matcher = NodeMatcher(load_model_proto(onnx_path, "--onnx-path"))
    previous = previous_files(out_dir)
    if previous and not overwrite:
        raise UserError(
            f"--out-dir {out_dir} already holds schemes ({previous[0].name}); pass --overwrite to replace them",
            flag="--overwrite",
        )
    mapping = map_layers(report, matcher)
    check_ks(ks, report, mapping, max_unmatched_frac, report_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in previous:
        path.unlink()
    setup_logging(out_dir / LOG_FILE)
    with manifest_run(
        out_dir / "manifest.json", "make_yolov10m_candidate_schemes.py", manifest_args or {}, argv, kind="schemes"
    ) as mf:
        common = {
            "report": str(report_path),
            "report_sha256": mf.add_input(report_path),
            "onnx_path": str(onnx_path),
            "onnx_sha256": mf.add_input(onnx_path),
            "precision": report.get("precision"),
        }
        written, random_written = write_schemes(out_dir, ks, mapping, common, matcher.order, random_seed)
        for k, path in written.items():
            mf.add_output(f"scheme_{candidate_tag(k)}", path)
        for k, path in random_written.items():
            mf.add_output(f"scheme_{candidate_tag(k, random_seed)}", path)
        summary = summarize(
            ks, report, report_path, onnx_path, mapping, max_unmatched_frac, written, random_written, random_seed
        )
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
        mf.add_output("summary", out_dir / SUMMARY_FILE)
        mf.update(matched=len(mapping.matched), unmatched=len(mapping.unmatched), matched_via=mapping.vias())
        if mapping.unmatched:
            first = mapping.unmatched[0]
            log.warning(
                "%d of %d report layers map to no node (first: %s: %s); see %s",
                len(mapping.unmatched),
                len(report["layers"]),
                first["name"],
                first["reason"],
                SUMMARY_FILE,
            )
    return SchemesResult(written, random_written, summary, out_dir / SUMMARY_FILE)
