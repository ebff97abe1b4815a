"""Cost controls for the optional audit hook (an LLM or any other reviewer of flagged rows).

The hook is a configured argv (``[audit] command``, never a shell string).  It receives JSON on
stdin, ``{"rows": [...]}``, and answers JSON on stdout, ``{"verdicts": [...], "tokens_used":
N}``, within ``timeout_seconds``.  Tokens are added to a per-day (UTC) ledger in the state DB;
at the soft limit a warning is logged once, and once the day's use exceeds it no hook runs until
the next day.  :func:`audit_budget` is what ``trainingd status`` and the summary show.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from daemon.settings import Settings
from daemon.store.db import StateStore

log = structlog.get_logger("training")


@dataclass(frozen=True, slots=True)
class AuditBudget:
    day: str
    tokens_used: int
    calls: int
    soft_limit: int
    warning: bool  # at or above the soft limit
    paused: bool  # above it: no audits until the next day
    enabled: bool  # a hook is configured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditResult:
    status: str  # ok, disabled, paused, failed, timeout
    verdicts: list[Any] = field(default_factory=list)
    tokens_used: int = 0
    reason: str = ""


def _utc_day(now: datetime) -> str:
    return (now.astimezone(UTC) if now.tzinfo else now).date().isoformat()


def audit_budget(store: StateStore, settings: Settings, now: datetime) -> AuditBudget:
    """Today's token use against the soft limit (read-only: safe from ``status``)."""
    day = _utc_day(now)
    try:
        row = store.conn.execute(
            "SELECT tokens, calls FROM token_ledger WHERE day = ?", (day,)).fetchone()
    except sqlite3.OperationalError:  # a state DB older than 0004_training: nothing spent
        row = None
    tokens, calls = (int(row[0]), int(row[1])) if row else (0, 0)
    limit = settings.audit.soft_limit_tokens_per_day
    return AuditBudget(day=day, tokens_used=tokens, calls=calls, soft_limit=limit,
                       warning=tokens >= limit, paused=tokens > limit,
                       enabled=bool(settings.audit.command))


def record_tokens(store: StateStore, settings: Settings, now: datetime,
                  tokens: int) -> AuditBudget:
    """Add one call's tokens to today's ledger; warn once when the soft limit is reached."""
    day = _utc_day(now)
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO token_ledger (day, tokens, calls) VALUES (?, ?, 1) "
            "ON CONFLICT(day) DO UPDATE SET tokens = tokens + excluded.tokens, calls = calls + 1",
            (day, max(0, tokens)))
        budget = audit_budget(store, settings, now)
        warned = conn.execute("SELECT warned FROM token_ledger WHERE day = ?", (day,)).fetchone()
        if budget.warning and not warned[0]:
            conn.execute("UPDATE token_ledger SET warned = 1 WHERE day = ?", (day,))
            log.warning("training.audit_soft_limit_reached", day=day, tokens=budget.tokens_used,
                        soft_limit=budget.soft_limit, paused=budget.paused)
    return budget


def run_audit(store: StateStore, settings: Settings, rows: list[dict[str, Any]],
              now: datetime) -> AuditResult:
    """Send flagged rows to the hook (at most ``max_rows_per_call``), if allowed today."""
    cfg = settings.audit
    if not cfg.command:
        return AuditResult("disabled", reason="no [audit] command configured")
    budget = audit_budget(store, settings, now)
    if budget.paused:
        return AuditResult("paused", reason=f"{budget.tokens_used} tokens used on {budget.day}, "
                                            f"soft limit {budget.soft_limit}; resumes next day")
    payload = json.dumps({"rows": rows[: cfg.max_rows_per_call]}, default=str)
    try:
        proc = subprocess.run(list(cfg.command), input=payload, capture_output=True, text=True,
                              timeout=cfg.timeout_seconds, check=False, shell=False)
    except subprocess.TimeoutExpired:
        log.warning("training.audit_timed_out", seconds=cfg.timeout_seconds)
        return AuditResult("timeout", reason=f"hook ran past {cfg.timeout_seconds} s")
    except OSError as exc:
        return AuditResult("failed", reason=f"cannot run the hook: {exc}")
    try:
        answer = json.loads(proc.stdout)
        tokens = int(answer.get("tokens_used", 0))
        verdicts = list(answer.get("verdicts", []))
    except (ValueError, TypeError, AttributeError):
        return AuditResult("failed", reason=f"hook exit {proc.returncode}; stdout is not the "
                                            "expected JSON object")
    record_tokens(store, settings, now, tokens)
    if proc.returncode != 0:
        return AuditResult("failed", verdicts, tokens, f"hook exit status {proc.returncode}")
    return AuditResult("ok", verdicts, tokens)


@dataclass(frozen=True, slots=True)
class AuditPass:
    """One pass of the audit task: ``status`` as :class:`AuditResult`'s, or ``nothing flagged``."""

    status: str
    rows: int | None = None
    tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.rows is not None:
            out.update(rows=self.rows, tokens=self.tokens)
        return out


def run_audit_pass(store: StateStore, settings: Settings, now: datetime, *,
                   allow: Callable[[float, str], None] = lambda seconds, note: None
                   ) -> AuditPass:
    """Send rows newly flagged with warnings to the hook, within the token budget; advance the
    mark and append the verdicts to ``audit_verdicts.jsonl`` only when the hook answered."""
    from daemon.fsutil import atomic_write_text
    from daemon.store.issue_repo import IssueRepo
    from daemon.timeparse import iso_utc

    if not settings.audit.command:
        return AuditPass("disabled")
    mark = int(store.get_meta("audit.last_issue_id") or 0)
    flagged = IssueRepo(store).flagged_after(mark, settings.audit.max_rows_per_call)
    if not flagged:
        return AuditPass("nothing flagged")
    # the hook is killed after audit.timeout_seconds: its own bound, not a stall
    allow(settings.audit.timeout_seconds + 30, "audit hook")
    result = run_audit(store, settings, [r.to_dict() for r in flagged], now)
    if result.status == "ok":
        with store.transaction():
            store.set_meta("audit.last_issue_id", str(flagged[-1].issue_id))
        ledger = settings.summaries_dir / "audit_verdicts.jsonl"
        old = ledger.read_text() if ledger.exists() else ""
        atomic_write_text(ledger, old + "".join(
            json.dumps({"at": iso_utc(now), "verdict": v}, default=str) + "\n"
            for v in result.verdicts))
    log.info("training.audit_ran", status=result.status, rows=len(flagged),
             tokens=result.tokens_used, reason=result.reason or None)
    return AuditPass(result.status, len(flagged), result.tokens_used)
