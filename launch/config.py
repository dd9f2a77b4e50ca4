"""Loading named experiments: the one registry is ``configs/experiment/*.yaml`` read through ``Experiment``.

Layers, later ones winning: the schema's defaults; the benchmark's data defaults
(``configs/data/<benchmark>.yaml``); the experiments a YAML ``extends`` (recursively); the YAML
itself; the command line's ``key=value`` overrides. A typo or a value of the wrong type is an
error naming the key and the layer it came from. Then the job's rules fill what other sections
determine (below), and the result is a frozen ``Experiment``, validated.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cosmos_policy.config import check_field_types, resolve_config_path
from cosmos_policy.errors import ConfigError
from cosmos_policy.layout import load_layout
from launch.experiment import LEARNER_DERIVED, Experiment


def experiment_names() -> list[str]:
    """The named experiments (configs/experiment/*.yaml)."""
    folder = resolve_config_path("experiment", "quickstart").parent
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_experiment(name_or_path: str | Path = "quickstart", overrides: list[str] | None = None) -> Experiment:
    """``configs/experiment/<name>.yaml`` (or a YAML path) with dotlist overrides (``online.rounds=5``)."""
    layers = _extended(name_or_path, seen=[])
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"the command line: {item!r}: expected key=value (e.g. online.rounds=5)")
    try:
        layers.append(("the command line", OmegaConf.from_dotlist(list(overrides or []))))
    except Exception as exc:  # OmegaConf's own errors, and YAML's for a value it cannot parse
        if isinstance(exc, OmegaConfBaseException):
            raise _one_line("the command line", exc) from None
        raise ConfigError(f"the command line: cannot read the overrides ({' '.join(str(exc).split())})") from None
    layers = [(source, _yaml_quirks(layer)) for source, layer in layers]
    for source, layer in layers:
        _check_values(source, layer)
    plain = OmegaConf.merge(*[layer for _, layer in layers])
    benchmark = OmegaConf.select(plain, "data.benchmark")
    if benchmark is not None:
        try:
            preset: Path | None = resolve_config_path("data", str(benchmark))
        except ConfigError as exc:
            raise ConfigError(f"data.benchmark: {exc}") from None
    else:
        preset = _data_preset(str(OmegaConf.select(plain, "model.layout") or "libero"))
    if preset is not None:
        layers.insert(0, (str(preset), OmegaConf.create({"data": OmegaConf.load(preset)})))
        _check_values(*layers[0])
    merged = _schema()
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _one_line(source, exc) from None  # the key, where it came from, and what was wrong: no chain
    data = OmegaConf.to_container(merged, resolve=True)
    _job_rules(data, plain)  # type: ignore[arg-type]
    try:
        return OmegaConf.to_object(OmegaConf.merge(_schema(), data))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _one_line("the experiment", exc) from None


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The schema as an OmegaConf config, built once: building it was half of a load's time, and
    ``OmegaConf.merge`` copies its first argument, so the one built here is never changed."""
    return OmegaConf.structured(Experiment)


def _one_line(source: str, exc: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's error as one line: where the key came from, the key, what was wrong (and its suggestion)."""
    first = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
    key = getattr(exc, "full_key", None)
    unknown = re.match(r"Key '([^']+)' not in '\w+'\.?\s*(?:Did you mean(?: one of)?:\s*(.+?)\?)?$", first)
    if unknown:
        what = "unknown key" + (f" (did you mean {unknown.group(2)}?)" if unknown.group(2) else "")
    else:
        what = first
    return ConfigError(f"{source}: {key}: {what}" if key else f"{source}: {what}")


def _extended(name_or_path: str | Path, seen: list[str]) -> list[tuple[str, DictConfig]]:
    """The YAML's layers: those of the experiment it extends first, then its own."""
    path = resolve_config_path("experiment", name_or_path)
    if str(path) in seen:
        raise ConfigError(f"extends: experiments extend each other in a circle ({' -> '.join(seen + [str(path)])})")
    try:
        layer = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError) as exc:  # YAML syntax errors are ValueErrors
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    base = layer.get("extends") if isinstance(layer, DictConfig) else None
    return (_extended(base, seen + [str(path)]) if base else []) + [(str(path), layer)]


def _data_preset(benchmark: str) -> Path | None:
    try:
        return resolve_config_path("data", benchmark)
    except ConfigError:
        return None  # a layout of the user's own has no data defaults: the schema's apply


def _yaml_quirks(layer: DictConfig) -> DictConfig:
    """YAML 1.1 reads a bare ``off`` as false: ``learner.float8: off`` (``server.float8: off``) means the string."""
    for section in ("learner", "server"):
        if OmegaConf.select(layer, f"{section}.float8") is False:
            layer = OmegaConf.merge(layer, {section: {"float8": "off"}})
    return layer


def _check_values(source: str, layer: DictConfig) -> None:
    """Each value ``layer`` sets, checked against the type of its schema field before OmegaConf merges it
    (``cosmos_policy.config.check_field_types``: OmegaConf would convert ``online.plan=-3`` to true and fail a
    list given for a mapping with a TypeError that names no key)."""
    values = OmegaConf.to_container(layer, resolve=False)
    if isinstance(values, dict):
        check_field_types(source, values, Experiment)


def _job_rules(data: dict[str, Any], given: DictConfig) -> None:
    """What the job derives from other sections where the experiment does not say."""
    learner = OmegaConf.select(given, "learner") or {}
    for key, owner in LEARNER_DERIVED.items():
        if key in learner:
            raise ConfigError(f"learner.{key}: set by the job from {owner}; remove it from the experiment")
    if OmegaConf.select(given, "policy.center_crop") is None:  # the test-time crop matches the training augmentation
        data["policy"]["center_crop"] = bool(data["data"]["augmentation"])
    if OmegaConf.select(given, "server.max_batch") is None:
        data["server"]["max_batch"] = max(8, int(data["online"]["runners"]))
    if OmegaConf.select(given, "replay.root") is None:
        data["replay"]["root"] = str(Path(data["run_dir"]) / "replay")
    # Replay hands out step windows the sample builder turns into training samples: their length is
    # the layout's action chunk (the future frame sits one chunk ahead), whatever env.execute is.
    try:
        window = load_layout(data["model"]["layout"]).action_chunk
    except ConfigError as exc:
        raise ConfigError(f"model.layout: {exc}") from None
    given_tables = OmegaConf.select(given, "replay.tables")
    for i, table in enumerate(data["replay"]["tables"]):
        if given_tables is None or "window" not in given_tables[i]:
            table["window"] = window


# ---- the files an experiment names, checked before anything starts ------------------------------
def check_inputs(cfg: Experiment) -> None:
    """Every path the experiment names exists and is what it should be; all problems named in one error."""
    from cosmos_policy.errors import CheckpointError
    from cosmos_policy.manifest import read_manifest

    problems = []
    if cfg.demos.source == "dataset" and cfg.demos.dataset:
        path = Path(cfg.demos.dataset)
        if not path.exists():
            problems.append(f"demos.dataset: {path} does not exist")
        elif cfg.demos.dataset_format == "episodes" and path.is_dir() and not any(path.rglob("*.hdf5")):
            problems.append(f"demos.dataset: no episode files (*.hdf5) under {path}")
    for key in ("checkpoint", "planning_checkpoint"):
        if getattr(cfg.model, key):
            try:
                read_manifest(getattr(cfg.model, key))
            except CheckpointError as exc:
                problems.append(f"model.{key}: {exc}")
    encoder = cfg.model.text_encoder
    if encoder not in (None, "random") and not (Path(encoder) / "config.json").is_file():
        problems.append(f"model.text_encoder: {encoder} is not a T5 encoder directory (no config.json there); or use 'random' or null")
    if cfg.gateway.enabled:
        try:
            cfg.gateway_config().validate()  # the token file and TLS files exist
        except ConfigError as exc:
            problems.append(str(exc) if str(exc).startswith("gateway.") else f"gateway: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))


# ---- documentation generated from the schema ------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal under it), for this class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value).splitlines()[0]
    return docs


def config_keys(cls: type = Experiment, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line docstring) of every leaf field of the schema, in order."""
    rows: list[tuple[str, Any, str]] = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            rows += config_keys(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", default, docs.get(f.name, "")))
    return rows
