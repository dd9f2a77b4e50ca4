"""Per-robot bearer tokens for the robot gateway (stdlib only).

Ray's token auth is one static secret for the whole cluster with no per-node identity; a robot
outside the cluster gets its own token instead, bound to its robot id, so one robot's stolen
token neither speaks for another robot nor survives its revocation.

The token file (JSON, written atomically, mode 0600) holds per robot id a random salt and
``sha256(salt + token)``: never a token in clear, so the file leaks nothing that opens the gateway.
``mint`` makes a token and prints it once; ``revoke`` removes a robot. A running gateway's
``TokenStore`` notices the file changing (inode, mtime, size; looked at most every
``check_every_s``) and reloads it, so a revoked token is refused from the first call after that
without a restart. Verification compares digests with ``hmac.compare_digest`` (constant time).

CLI: ``python -m actors.robots.tokens add --file tokens.json --robot arm-1`` (prints the token),
``revoke --file tokens.json --robot arm-1``, ``list --file tokens.json``.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

FILE_VERSION = 1
ROBOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # travels in a gRPC header and names files


class TokenError(ValueError):
    """A robot id or token file that cannot be used (names which and why)."""


class Verdict(enum.Enum):
    """What a presented token proves: the robot it claims, another robot (PERMISSION_DENIED), or nothing (UNAUTHENTICATED)."""

    OK = "ok"
    WRONG_ROBOT = "wrong_robot"
    UNKNOWN = "unknown"


def check_robot_id(robot_id: str) -> str:
    if not isinstance(robot_id, str) or not ROBOT_ID.fullmatch(robot_id):
        raise TokenError(f"robot id {robot_id!r}: expected 1-64 characters of letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")
    return robot_id


def digest(salt_hex: str, token: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + token.encode("utf-8")).hexdigest()


# ---- the file ----------------------------------------------------------------------------------------
def read_file(path: str | Path) -> dict[str, dict[str, str]]:
    """robot id -> {salt, sha256, created} from a token file; ``TokenError`` naming the file when it is malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TokenError(f"{path}: token file not found (make one with `python -m actors.robots.tokens add`)") from None
    except (OSError, ValueError) as exc:
        raise TokenError(f"{path}: unreadable token file ({exc})") from exc
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("robots"), dict):
        raise TokenError(f"{path}: expected {{'version': {FILE_VERSION}, 'robots': {{...}}}}")
    robots = data["robots"]
    for rid, entry in robots.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("salt"), str) and isinstance(entry.get("sha256"), str)):
            raise TokenError(f"{path}: robots.{rid}: expected {{'salt': hex, 'sha256': hex}}")
        try:
            bytes.fromhex(entry["salt"])
        except ValueError:
            raise TokenError(f"{path}: robots.{rid}.salt: not hex") from None
    return robots


def _write_file(path: Path, robots: dict[str, dict[str, str]]) -> None:
    """Atomically (a reader sees the old file or the new one, never half of one), readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": FILE_VERSION, "robots": robots}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _FileLock:
    """Serializes read-modify-write of the token file between CLI runs (a sidecar lock file, POSIX flock)."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(f".{path.name}.lock")

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def mint(path: str | Path, robot_id: str) -> str:
    """A new token for ``robot_id`` (replacing its old one, which stops working); only its salted hash is stored."""
    path = Path(path)
    check_robot_id(robot_id)
    with _FileLock(path):
        robots = read_file(path) if path.exists() else {}
        token = "cpr_" + secrets.token_urlsafe(32)  # a prefix: never read as a CLI option, easy for secret scanners
        salt = secrets.token_hex(16)
        robots[robot_id] = {"salt": salt, "sha256": digest(salt, token), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_file(path, robots)
    return token


def revoke(path: str | Path, robot_id: str) -> bool:
    """Remove ``robot_id``'s token; True when it had one. A running gateway refuses it after its next look at the file."""
    path = Path(path)
    with _FileLock(path):
        robots = read_file(path)
        if robot_id not in robots:
            return False
        del robots[robot_id]
        _write_file(path, robots)
    return True


# ---- the gateway's view ------------------------------------------------------------------------------
class TokenStore:
    """The token file as a running gateway sees it: reloaded when it changes, checked at most every ``check_every_s``.

    A file that becomes unreadable or malformed refuses every robot until it is fixed (fail closed:
    a half-edited file must not re-admit a revoked robot), with one logged error per change.
    """

    def __init__(self, path: str | Path, check_every_s: float = 0.5) -> None:
        self.path = Path(path)
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._robots = read_file(self.path)  # a bad file at start is an error, not an empty gateway
        self._key = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def robots(self) -> dict[str, dict[str, str]]:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.check_every_s:
                self._checked = now
                key = self._stat()
                if key != self._key:
                    self._key = key
                    try:
                        self._robots = read_file(self.path)
                        log.info("token file %s reloaded: %d robots", self.path, len(self._robots))
                    except TokenError as exc:
                        self._robots = {}
                        log.error("%s; refusing every robot until it is fixed", exc)
            return self._robots

    def verify(self, robot_id: str, token: str) -> Verdict:
        """Whether ``token`` is ``robot_id``'s (OK), another robot's (WRONG_ROBOT), or nobody's (UNKNOWN)."""
        robots = self.robots()
        entry = robots.get(robot_id)
        if entry is not None and hmac.compare_digest(digest(entry["salt"], token), entry["sha256"]):
            return Verdict.OK
        for other, e in robots.items():
            if other != robot_id and hmac.compare_digest(digest(e["salt"], token), e["sha256"]):
                return Verdict.WRONG_ROBOT
        return Verdict.UNKNOWN


# ---- CLI ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.robots.tokens", description="Per-robot tokens of the robot gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("add", "mint a token for a robot (replaces its old one) and print it once"),
                       ("revoke", "remove a robot's token"), ("list", "list the robot ids that have a token")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--file", required=True, help="the gateway's token file (JSON)")
        if name != "list":
            p.add_argument("--robot", required=True, help="the robot id")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            token = mint(args.file, args.robot)
            print(f"# token for robot {args.robot} (shown once; the file keeps only its salted hash):", file=sys.stderr)
            print(token)
        elif args.command == "revoke":
            if not revoke(args.file, args.robot):
                print(f"error: {args.file}: robot {args.robot!r} has no token", file=sys.stderr)
                return 1
            print(f"revoked robot {args.robot}; a running gateway refuses it within a second", file=sys.stderr)
        else:
            for rid in sorted(read_file(args.file)):
                print(rid)
    except TokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
