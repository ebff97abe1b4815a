"""The data gate before every training run: inspect first, then refuse bad data, saying why.

The playbook's "inspect before bulk operations": a run writes the inspection report (with the
duplicate and near-duplicate units and this gate's figures) *before* it fits anything, and
refuses when, for any project,

* the rows failing must-pass checks (an error-severity issue on the row) are more than
  ``training.gate_max_error_share`` of the project's rows, or
* the share of usable rows whose images all have a vector (``DatasetInfo.coverage``) is below
  ``training.gate_min_coverage``.

A project with no rows in the source DB or no usable rows is not judged on that share (nothing
to divide by).  The outcome names the report so a person can open it.  Call
:func:`data_gate` after the dataset is loaded (read-only) and before training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from daemon.settings import Settings
from daemon.store.db import StateStore
from daemon.training.units import Units

log = structlog.get_logger("training")


@dataclass(frozen=True)
class GateResult:
    """Whether training may go on, why not, and the report it wrote."""

    passed: bool
    reason: str
    report: Path | None
    markdown: Path | None = None
    projects: dict[str, dict[str, Any]] = field(default_factory=dict)


def judge(report: Mapping[str, Any], coverage: Mapping[str, Mapping[str, int]], *,
          max_error_share: float, min_coverage: float,
          untrained: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Per project: the figures and the failed checks (pure: tested with tables).  Projects in
    ``untrained`` (``train = false``) are listed with their figures but never fail the gate:
    none of their rows reaches training."""
    invalid: dict[str, int] = {}
    for r in report.get("invalid_rows", []):
        invalid[r["project"]] = invalid.get(r["project"], 0) + 1
    names = set(report.get("counts_by_project", {})) | set(coverage)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        rows = int(report.get("counts_by_project", {}).get(name, 0) or 0)
        bad = invalid.get(name, 0)
        cov = coverage.get(name, {})
        usable, embedded = int(cov.get("rows", 0)), int(cov.get("embedded", 0))
        share = bad / rows if rows else None
        covered = embedded / usable if usable else None
        failures: list[str] = []
        if name in untrained:
            pass  # validation-only: reported, never trained on, so never a reason to refuse
        elif share is not None and share > max_error_share:
            failures.append(f"{bad} of {rows} rows ({share:.1%}) fail must-pass checks, above "
                            f"training.gate_max_error_share {max_error_share:.0%}")
        if name not in untrained and covered is not None and covered < min_coverage:
            failures.append(f"only {embedded} of {usable} usable rows ({covered:.1%}) have every "
                            f"image embedded, below training.gate_min_coverage "
                            f"{min_coverage:.0%}")
        out[name] = {"rows": rows, "invalid_rows": bad,
                     "error_share": None if share is None else round(share, 4),
                     "usable_rows": usable, "embedded_rows": embedded,
                     "coverage": None if covered is None else round(covered, 4),
                     "trained": name not in untrained, "failures": failures}
    return out


def data_gate(settings: Settings, store: StateStore, now: datetime, *,
              coverage: Mapping[str, Mapping[str, int]], units: Units | None = None,
              kind: str = "") -> GateResult:
    """Write the inspection report (with units and gate figures), then judge every project."""
    from daemon.reports import build_inspection, write_inspection
    from daemon.validation import discover_projects

    t = settings.training
    s = settings.sources
    report = build_inspection(discover_projects(settings), [], store, now=now,
                              first_rows=settings.validation.report_first_rows,
                              busy_timeout_ms=s.busy_timeout_ms,
                              busy_budget_seconds=s.busy_retry_seconds,
                              units=units.report_rows() if units is not None else [])
    from daemon.training.dataset import untrained_projects

    projects = judge(report, coverage, max_error_share=t.gate_max_error_share,
                     min_coverage=t.gate_min_coverage, untrained=untrained_projects(settings))
    failed = {p: g["failures"] for p, g in projects.items() if g["failures"]}
    # how the near duplicates were searched: the threshold trainingd similar marks, the cells
    report["near_duplicate_search"] = units.search if units is not None else None
    report["gate"] = {"kind": kind, "passed": not failed, "projects": projects,
                      "max_error_share": t.gate_max_error_share,
                      "min_coverage": t.gate_min_coverage}
    json_path, md_path = write_inspection(report, settings.summaries_dir, now)
    if failed:
        why = "; ".join(f"{p}: {' and '.join(f)}" for p, f in failed.items())
        log.warning("training.gate_refused", kind=kind, report=str(json_path), projects=failed)
        return GateResult(False, f"data gate refused training ({why}); see {json_path}",
                          json_path, md_path, projects)
    log.info("training.gate_passed", kind=kind, report=str(json_path))
    return GateResult(True, f"data gate passed; inspection report {json_path}", json_path,
                      md_path, projects)
