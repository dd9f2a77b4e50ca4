"""Reverb's checkpoints and the books that go with them.

``checkpoint`` writes the books first (a Reverb checkpoint without its books is unusable), then
takes Reverb's checkpoint (``DefaultCheckpointer``; Reverb keeps the latest), then writes the
books again naming it, so a crash anywhere leaves a matching pair. ``warm_start`` finds that
pair again before a (re)start of the server and says whether it can be used: when the books and
the checkpoint do not match, or the episode files written since would carry Reverb's restored
limiter past its bound, it clears Reverb's checkpoints and the tables are rebuilt from the
episode files alone. ``server_matches`` checks what the restarted server restored.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from cosmos_policy.atomic import atomic_write_bytes
from replay.files import EpisodeFiles
from replay.reverb_book import ReverbBook, limiter_spec, table_spec
from replay.reverb_process import ReverbServerProcess

CHECKPOINTS = "reverb"  # Reverb's own checkpoints, under the replay root
SERVICE_STATE = "reverb-service.json"  # the books matching the latest Reverb checkpoint
PENDING_STATE = "reverb-service.pending.json"  # written just before a Reverb checkpoint is taken


def checkpoint(root: Path, books: dict[str, ReverbBook], server: ReverbServerProcess) -> Path:
    """Reverb's checkpoint of every table plus the books, as one consistent pair; returns the books' file."""
    state: dict[str, Any] = {"version": 1, "tables": {name: book.state() for name, book in books.items()}}
    atomic_write_bytes(root / PENDING_STATE, json.dumps(state).encode())
    path = server.call(lambda: server.client.checkpoint())
    state["reverb_checkpoint"] = Path(path).name
    atomic_write_bytes(root / SERVICE_STATE, json.dumps(state).encode())
    (root / PENDING_STATE).unlink(missing_ok=True)
    return root / SERVICE_STATE


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished(root: Path) -> list[Path]:
    """Reverb's checkpoints that were completed, oldest first; unfinished ones (cut short) are deleted."""
    folder = root / CHECKPOINTS
    done = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (p / "DONE").exists():
            done.append(p)
        else:
            shutil.rmtree(p, ignore_errors=True)
    return done


def _saved_state(root: Path) -> dict[str, Any] | None:
    """The books that match Reverb's latest checkpoint, or None when there is no such pair."""
    done = _finished(root)
    latest = done[-1].name if done else None
    final, pending = _read_json(root / SERVICE_STATE), _read_json(root / PENDING_STATE)
    chosen = None
    if latest is not None and final is not None and final.get("reverb_checkpoint") == latest:
        chosen = final
    elif latest is not None and pending is not None:  # Reverb's checkpoint finished, the final books were not written
        chosen = {**pending, "reverb_checkpoint": latest}
        atomic_write_bytes(root / SERVICE_STATE, json.dumps(chosen).encode())
    (root / PENDING_STATE).unlink(missing_ok=True)
    return chosen


def _late_files_fit(saved: dict[str, Any], books: dict[str, ReverbBook], files: EpisodeFiles) -> bool:
    """Whether re-inserting the files written since the checkpoint stays inside Reverb's restored limiter."""
    for name, book in books.items():
        state = saved.get("tables", {}).get(name)
        if state is None:
            return False
        rl = book.config.rate_limiter
        if rl.kind == "min_size":
            continue
        late_items = 0
        for path in files.late(name, {e["episode_id"] for e in state["episodes"]}):
            ep = files.read(path)
            late_items += 0 if ep is None else ep.num_steps
        c = state["counters"]
        if (c["inserted_items"] + late_items) * rl.samples_per_insert - c["draws"] > limiter_spec(book.config)["max_diff"]:
            return False
    return True


def warm_start(root: Path, books: dict[str, ReverbBook], files: EpisodeFiles) -> dict[str, Any] | None:
    """The saved books to restore with Reverb's checkpoint, or None (Reverb's checkpoints cleared: rebuild from files)."""
    saved = _saved_state(root)
    if saved is not None and not _late_files_fit(saved, books, files):
        saved = None
    if saved is None:
        discard(root)
    return saved


def discard(root: Path) -> None:
    shutil.rmtree(root / CHECKPOINTS, ignore_errors=True)


def server_matches(server: ReverbServerProcess, books: dict[str, ReverbBook], saved: dict[str, Any]) -> bool:
    """Whether the restored Reverb tables are the configured ones and hold what the books say."""
    info = server.call(lambda: server.client.server_info())
    if set(info) != set(books):
        return False
    for name, book in books.items():
        table, state, spec = info[name], saved["tables"][name], table_spec(book.config)
        rl, lim = table.rate_limiter_info, spec["rate_limiter"]
        size = sum(sum(e["live"]) for e in state["episodes"]) + len(state["tombstones"])
        expected = (spec["max_size"], spec["max_times_sampled"], float(lim.get("min_diff", -sys.float_info.max)),
                    float(lim.get("max_diff", sys.float_info.max)), lim["min_size"], size)
        found = (table.max_size, table.max_times_sampled, rl.min_diff, rl.max_diff, rl.min_size_to_sample, table.current_size)
        if expected != found:
            return False
    return True
