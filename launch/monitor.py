"""The main job's one logger: a JSONL file, W&B, a success-rate plot and progress lines.

Every metric goes to ``metrics.jsonl`` in the run directory (one JSON object per line, with the
wall time and the record's kind) and to W&B. W&B runs online when it can (an API key is set), or
offline (files under the run directory, to ``wandb sync`` later), or not at all; the JSONL file
is written in every case, so tests and people without W&B read the same numbers. After each
evaluation a PNG of the success-rate curve (overall and per task, against the weight version)
is redrawn next to it, and ``loop.png``: the online loop's rates and staleness over wall time. A restarted job appends to the same file and resumes the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cosmos_policy.errors import ConfigError

WANDB_MODES = ("auto", "online", "offline", "disabled")


class Monitor:
    """Writes metrics to ``<run_dir>/metrics.jsonl`` and W&B; draws ``<run_dir>/success_rate.png``."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], wandb_mode: str = "auto", project: str = "cosmos-policy-online",
                 entity: str | None = None, name: str | None = None) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb: expected one of {WANDB_MODES}, got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.plot_path = self.run_dir / "success_rate.png"
        self.start = time.time()
        self._last_progress: dict[str, float] = {}  # phase -> when its last progress line was printed
        # A resumed run continues the wall clock of the first one (its records' wall_s).
        previous = self.records()
        self.offset = max((r.get("wall_s", 0.0) for r in previous), default=0.0)
        # The learner and the collection report from threads of their own (online.loop: asynchronous): a
        # record is written, and sent to W&B, whole.
        self._lock = threading.Lock()
        self._file = self.path.open("a", buffering=1)
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # a line cut by a crash stays alone (and is skipped when read)
        self.wandb = None
        self.wandb_dir: Path | None = None
        mode = wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            self.wandb = self._start_wandb(mode, config, project, entity, name)

    def _start_wandb(self, mode: str, config: dict[str, Any], project: str, entity: str | None, name: str | None) -> Any:
        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.wandb_dir = self.run_dir
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow", mode=mode,
                         dir=str(self.run_dir), config=config, settings=wandb.Settings(console="off"))
        # Success rates are plotted against the weight version and wall time, losses against learner steps.
        run.define_metric("weight_version")
        run.define_metric("wall_s")
        run.define_metric("eval/*", step_metric="weight_version")
        run.define_metric("learner/*", step_metric="learner/step")
        return run

    # ---- writing -----------------------------------------------------------------------
    def log(self, kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """One record: ``kind`` says what it is (eval, learner, collect, replay...); returns what was written."""
        record = {"kind": kind, "time": time.time(), "wall_s": round(self.offset + time.time() - self.start, 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with self._lock:
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            kind = record["kind"]
            numeric = {f"{kind}/{k}" if not k.startswith(f"{kind}/") and k not in ("weight_version", "round") else k: v
                       for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time"}
            numeric["wall_s"] = record["wall_s"]
            try:
                self.wandb.log(numeric)
            except Exception as exc:  # noqa: BLE001 (W&B's process gone: the metrics file goes on, the run does too)
                self._lost_wandb(exc)

    def learner(self, phase: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """One record for a chunk of learner steps: the means of the chunk's metrics, and the last step and
        published version (counters: a mean of versions would be no version at all)."""
        if not rows:
            return {}
        keys = {k for r in rows for k in r}
        summary: dict[str, Any] = {}
        for k in sorted(keys):
            values = [r[k] for r in rows if r.get(k) is not None]
            if k in ("step", "published_version", "lr"):
                summary[k] = values[-1] if values else None
            elif k == "staleness_max_versions" and values:
                summary[k] = max(values)
            elif values:
                summary[k] = sum(values) / len(values)
        record = {("learner/step" if k == "step" else k): v for k, v in summary.items() if v is not None}
        return self.log("learner", {"phase": phase, **record, **extra})

    def progress(self, phase: str, done: int, total: int, extra: str = "", every_s: float = 10.0) -> None:
        """A progress line for long phases (stdout: the terminal, or ``ray job logs``): the first and the last,
        and between them at most one per ``every_s`` seconds, so that fast phases do not flood the log and
        slow ones (a step of seconds on a busy CPU) still speak well within a minute."""
        now = time.time()
        if done < total and now - self._last_progress.get(phase, -1e9) < every_s:
            return
        self._last_progress[phase] = now
        pct = 100.0 * done / total if total else 100.0
        print(f"[{self.elapsed():7.1f} s] {phase}: {done}/{total} ({pct:3.0f} %){' ' + extra if extra else ''}", flush=True)

    def elapsed(self) -> float:
        return self.offset + time.time() - self.start

    # ---- reading and plotting ----------------------------------------------------------
    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every record written so far (this run and the runs it resumed), optionally of one kind."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: the rest of the file is still good
                continue
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
        return out

    def plot(self) -> Path | None:
        """Redraw the success-rate curve from the eval records; returns the PNG's path (None: no evals yet)."""
        evals = self.records("eval")
        if not evals:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        calibrated = [e for e in evals if isinstance(e.get("calibration/value_if_success"), (int, float))
                      or isinstance(e.get("calibration/value_mean"), (int, float))]
        fig, axes = plt.subplots(1, 3 if calibrated else 2, figsize=(16 if calibrated else 11, 4))
        ax, ax_t = axes[0], axes[1]
        ax_t.sharey(ax)
        for label, key, style in (("with planning", "success_rate", "o-"), ("policy alone", "success_rate_no_plan", "s--")):
            pts = [(e["weight_version"], e["wall_s"], e[key]) for e in evals if isinstance(e.get(key), (int, float))]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], style, label=f"overall, {label}", linewidth=2)
            ax_t.plot([p[1] / 60 for p in pts], [100 * p[2] for p in pts], style, label=f"overall, {label}", linewidth=2)
        for e in self.records("eval_fresh"):  # the states used for nothing else, at the version they were played
            for label, key, marker in (("fresh states, with planning", "success_rate", "D"), ("fresh states, policy alone", "success_rate_no_plan", "x")):
                if isinstance(e.get(key), (int, float)):
                    ax.plot([e["weight_version"]], [100 * e[key]], marker, markersize=9, label=f"{label} ({e.get('episodes')} episodes)")
        self._plot_promotion(ax)
        tasks = sorted({k[len("task/"):] for e in evals for k in e if k.startswith("task/")})
        if len(tasks) > 12:  # too many for lines: a map of every task's success at every version evaluated
            self.plot_tasks(evals, tasks)
        if 1 < len(tasks) <= 12:
            for task in tasks:
                pts = [(e["weight_version"], e[f"task/{task}"]) for e in evals if f"task/{task}" in e]
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], ".:", alpha=0.6, label=task)
        from matplotlib.ticker import MaxNLocator

        for axis in (ax, *axes[2:]):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # weight versions are whole publications
        ax.set_xlabel("weight version of the planning model (learner publications)")
        ax.set_ylabel("success rate (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax_t.set_xlabel("wall time (minutes)")
        ax_t.grid(alpha=0.3)
        if calibrated:  # what learning shows online before success does: the value separating successes from failures
            ax_v = axes[2]
            for label, key, style in (("predicted value, all episodes", "calibration/value_mean", "k.-"),
                                      ("... of episodes that succeeded", "calibration/value_if_success", "g^-"),
                                      ("... of episodes that failed", "calibration/value_if_failure", "rv-")):
                pts = [(e["weight_version"], e[key]) for e in calibrated if isinstance(e.get(key), (int, float))]
                if pts:
                    ax_v.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            ax_v.set_xlabel("weight version of the planning model")
            ax_v.set_ylabel("predicted value (evaluation episodes)")
            ax_v.set_ylim(-0.02, 1.02)
            ax_v.grid(alpha=0.3)
            ax_v.legend(fontsize=8)
        sizes = sorted({e.get("episodes") for e in evals if isinstance(e.get("episodes"), int)})
        each = " or ".join(map(str, sizes)) if sizes else "?"
        fig.suptitle(f"{self.run_dir.name}: success rate per evaluation ({each} episodes each)")
        _save(fig, self.plot_path)
        self.plot_loop()
        return self.plot_path

    def plot_tasks(self, evals: list[dict[str, Any]], tasks: list[str]) -> Path:
        """``tasks.png``: per task (rows) its success at each evaluated version (columns), so a task that later versions
        forgot shows as a row that darkens (multi-task LIBERO's 40 tasks are too many for the curve's lines)."""
        import matplotlib
        import matplotlib.pyplot as plt
        import numpy as np

        grid = np.array([[e.get(f"task/{t}", np.nan) for e in evals] for t in tasks], dtype=float)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(evals) + 4), max(4.0, 0.22 * len(tasks) + 1.5)))
        image = ax.imshow(100 * grid, aspect="auto", vmin=0, vmax=100, cmap=matplotlib.colormaps["viridis"])
        ax.set_xticks(range(len(evals)), [str(e.get("weight_version")) for e in evals])
        ax.set_yticks(range(len(tasks)), [t[:60] for t in tasks], fontsize=6)
        ax.set_xlabel("weight version of the planning model (each evaluation)")
        fig.colorbar(image, ax=ax, label="success rate (%)")
        fig.suptitle(f"{self.run_dir.name}: success per task at each evaluated version")
        path = self.run_dir / "tasks.png"
        _save(fig, path)
        return path

    def _plot_promotion(self, ax: Any) -> None:
        """The promotion gate's decisions (``launch.promotion``) at their planning versions: each candidate's success on
        the gate's states, marked promoted, rejected (never served) or rolled back (failed live)."""
        marks = {"promoted": ("^", "tab:green"), "rejected": ("X", "tab:red"), "rolled_back": ("v", "tab:purple")}
        rows = self.records("promotion")
        for status, (marker, color) in marks.items():
            pts = [(r.get("planning_version", r.get("policy_version")), r.get("success", r.get("live_success"))) for r in rows
                   if r.get("status") == status]
            pts = [p for p in pts if isinstance(p[0], int) and isinstance(p[1], (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker, color=color, markersize=9, linestyle="none",
                        label=f"gate: {status.replace('_', ' ')}" + (" (live success)" if status == "rolled_back" else ""))

    def plot_loop(self) -> Path | None:
        """Redraw ``loop.png``, how the online loop ran, from the ``rates`` and online ``learner`` records: env steps
        and learner samples per second over wall time (both above zero at once: the actors and the learner work
        at once), and the staleness of what the learners trained on (bounded: ``online.collect_ahead``).
        Returns its path (None: no rates yet)."""
        rates = self.records("rates")
        if not rates:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(12, 4))
        minutes = [(r["wall_s"] - r["interval_s"] / 2) / 60 for r in rates]
        for label, key, style in (("env steps/s (collection)", "env_steps_per_s", "b.-"), ("learner samples/s", "learner_samples_per_s", "r.-")):
            ax_r.plot(minutes, [r[key] for r in rates], style, label=label)
        ax_r.set_xlabel("wall time (minutes)")
        ax_r.set_ylabel("per second, over each interval")
        ax_r.grid(alpha=0.3)
        ax_r.legend(fontsize=8)
        online = [r for r in self.records("learner") if str(r.get("phase", "")).endswith("_online")]
        for phase in sorted({r["phase"] for r in online}):
            rows = [r for r in online if r["phase"] == phase and isinstance(r.get("staleness_versions"), (int, float))]
            ax_s.plot([r["wall_s"] / 60 for r in rows], [r["staleness_versions"] for r in rows], "o-", label=f"{phase}: mean")
            peaks = [r for r in rows if isinstance(r.get("staleness_max_versions"), (int, float))]
            ax_s.plot([r["wall_s"] / 60 for r in peaks], [r["staleness_max_versions"] for r in peaks], "^:", label=f"{phase}: largest")
        ax_s.set_xlabel("wall time (minutes)")
        ax_s.set_ylabel("lag of the sampled experience (weight versions)")
        ax_s.grid(alpha=0.3)
        if online:
            ax_s.legend(fontsize=8)
        fig.suptitle(f"{self.run_dir.name}: the online loop (rates every {rates[0]['interval_s']:.0f} s; staleness per round)")
        path = self.run_dir / "loop.png"
        _save(fig, path)
        return path

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
                self.wandb = None
            except Exception as exc:  # noqa: BLE001
                self._lost_wandb(exc)

    def _lost_wandb(self, exc: BaseException) -> None:
        """W&B's service process died under the job (``ray job stop`` signals the job's whole process tree):
        one warning, W&B off for the rest of the run; metrics.jsonl keeps every record, and what W&B had
        written stays in its directory for ``wandb sync``."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        say(f"warning: W&B stopped answering ({type(exc).__name__}: {first[:120]}); metrics go on to {self.path} only, "
            f"and `wandb sync {self.wandb_dir / 'wandb'}/offline-run-*` (or the online run's directory) uploads what W&B wrote")
        self.wandb = None
        try:
            import wandb

            wandb.teardown()  # its exit hook would print the same failure again as a traceback
        except Exception:  # noqa: BLE001
            pass


def _save(fig: Any, path: Path) -> None:
    """Write a figure so that a reader never sees half a PNG, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)
