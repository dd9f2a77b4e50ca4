"""Bad input at three boundaries, generated: experiment configs, checkpoints and episode files.

Property-based (hypothesis, 200 generated cases per boundary), on real files in temporary
directories, no mocks:

- Experiment configs: ``launch.config.load_experiment("quickstart", [key=value])`` for keys of
  the typed ``Experiment`` schema (walked from its dataclass fields) given values of the wrong
  type or out of range (strings for numbers, numbers for bools, lists for scalars and the
  reverse, negative counts, NaN and infinities, names no enum knows), unknown keys and unknown
  sections. Each is a ``ConfigError`` naming the dotted key and what was expected, never
  another exception; a key given its own (valid) value loads to that value.
- Checkpoints: one tiny checkpoint saved once, each case a copy damaged one way (a file cut at
  a random offset or deleted; a weight file rewritten with a tensor missing, extra, of another
  shape or dtype; manifest.json, config.yaml, the statistics or the text embeddings with a
  field of the wrong type or size, their checksums updated so the damage reaches the reader).
  ``load_checkpoint`` raises ``CheckpointError`` naming the file and the key, in one line.
- Episode files: one episode (recorded with ``EpisodeRecorder``) written once, each case a copy
  damaged with h5py (a dataset or attribute deleted, a dataset replaced by an array of random
  shape and dtype, an attribute of another type, the file cut short). ``read_episode`` raises
  ``EpisodeFileError`` naming the file and the field, unless what the damage left is still a
  valid episode (an oracle here says when: an optional field deleted, a float32 array turned
  int), in which case it reads.

Every error must be one line (no library report, no traceback). A few fixed examples per boundary
pin the wording of the messages; an undamaged checkpoint and episode file load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load as load_safetensors, save as save_safetensors

from cosmos_policy.checkpoint import load_checkpoint, save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import load_model_config, model_config_to_dict
from cosmos_policy.data.episode_file import FORMAT as EPISODE_FORMAT, IMAGE_SUFFIX, EpisodeFileError, read_episode, write_episode
from cosmos_policy.episode import EpisodeRecorder, PlannerQuery, Source
from cosmos_policy.errors import CheckpointError, ConfigError
from cosmos_policy.layout import load_layout
from cosmos_policy.manifest import FORMAT as CHECKPOINT_FORMAT
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
from launch.config import load_experiment
from launch.experiment import LEARNER_DERIVED, Experiment

PROPERTY = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(message: str) -> None:
    """A clear error is one line of our own words, not a library's multi-line report or a traceback."""
    assert "\n" not in message and "Traceback" not in message, message


# =============================================================================================
# 1. Experiment configs
# =============================================================================================
def _schema_leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotated type) of every leaf field of the experiment schema."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            leaves += _schema_leaves(tp, f"{prefix}{f.name}.")
        else:
            leaves.append((f"{prefix}{f.name}", tp))
    return leaves


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type, optional) of ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        kinds = [a for a in typing.get_args(tp) if a is not type(None)]
        return (kinds[0] if len(kinds) == 1 else Any), len(kinds) < len(typing.get_args(tp))
    return tp, False


LEAVES = [(key, *_unwrap(tp)) for key, tp in _schema_leaves(Experiment) if key not in ("name", "extends")]
# String fields whose values are names from a fixed set (a random word is never one of them).
NAMED = {"model.size", "model.layout", "model.planning_size", "model.device", "env.name", "demos.source", "demos.dataset_format",
         "data.benchmark", "online.loop", "logging.wandb", "policy.mode", "planner.aggregation", "planner.value_kind",
         "planner.depth_value", "replay.backend", "learner.precision", "learner.vae_encode", "learner.vae_dtype", "learner.float8"}
MIXTURES = {"data.policy_mixture", "data.policy_online_mixture", "data.planning_mixture"}  # a preset name or a mapping

words = st.from_regex(r"zq[a-z_]{1,8}", fullmatch=True)  # never a YAML keyword, a number or a known name
negative_ints = st.integers(-10**9, -1)
negative_floats = st.floats(-1e6, -1e-3)
fractions = st.integers(-50, 50).map(lambda i: i + 0.5)
non_finite = st.sampled_from([".nan", ".inf", "-.inf", "nan", "inf", "-inf", "1e400"])
lists = st.lists(st.integers(0, 9), min_size=1, max_size=3)
mappings = st.dictionaries(words, st.integers(0, 9), min_size=1, max_size=2)


def _yaml_value(value: Any) -> str:
    """A value as a command line override writes it (YAML flow style)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _bad_values(key: str, tp: Any, optional: bool) -> st.SearchStrategy[str] | None:
    """Override values that are wrong for a field of type ``tp``, as YAML text."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    null = [] if optional else [st.just("null")]
    if tp is bool:
        options = [st.integers(-5, 5), fractions, words, lists, mappings]
    elif tp is int:
        options = [negative_ints, fractions, words, st.booleans(), lists, mappings, non_finite, *null]
    elif tp is float:
        options = [negative_ints, negative_floats, non_finite, words, st.booleans(), lists, mappings, *null]
    elif tp is str:
        # learner.float8: false is YAML 1.1's reading of a bare `off`, and means "off" (launch.config._yaml_quirks)
        flags = st.just(True) if key == "learner.float8" else st.booleans()
        options = [flags, lists, mappings, *null] + ([words] if key in NAMED else [])
    elif origin in (list, tuple) and args and args[0] is int:  # eval.seeds, planner.*_steps: counts and seeds
        options = [st.integers(-5, 5), words, mappings, st.lists(negative_ints, min_size=1, max_size=3)]
    elif origin is tuple:  # learner.betas: two values in [0, 1)
        options = [st.floats(0.0, 0.9), words, mappings, st.lists(st.floats(1.0, 5.0), min_size=2, max_size=2),
                   st.lists(st.floats(0.0, 0.9), min_size=3, max_size=4)]
    elif origin is list:
        options = [st.integers(-5, 5), words, mappings]
    elif origin is dict or tp is dict:
        options = [st.integers(-5, 5), words, lists]
    elif key in MIXTURES:
        options = [st.integers(-5, 5), fractions, lists, words]
    else:
        return None
    return st.one_of(*options).map(_yaml_value)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


QUICKSTART = load_experiment("quickstart")
DERIVED = {f"learner.{key}" for key in LEARNER_DERIVED}  # set by the job: naming them is an error, whatever the value
VALID_KEYS = [key for key, _, _ in LEAVES if key not in DERIVED and key not in ("replay.tables", "robots")]

bad_overrides = st.sampled_from(LEAVES).flatmap(
    lambda leaf: _bad_values(*leaf).map(lambda value: ("bad", leaf[0], f"{leaf[0]}={value}")))
unknown_keys = st.one_of(  # an unknown key in a known section: named; in an unknown section: the section is named
    st.tuples(st.sampled_from(sorted({key.split(".")[0] for key, _, _ in LEAVES if "." in key})), words).map(
        lambda parts: ("bad", ".".join(parts), f"{'.'.join(parts)}=1")),
    st.tuples(words, words).map(lambda parts: ("bad", parts[0], f"{'.'.join(parts)}=1")),
)
valid_overrides = st.sampled_from(VALID_KEYS).map(
    lambda key: ("valid", key, f"{key}={_yaml_value(_plain(_get(QUICKSTART, key)))}"))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def test_the_schema_walk_covers_every_section():
    sections = {key.split(".")[0] for key, _, _ in LEAVES}
    assert {"online", "eval", "learner", "replay", "env", "offline", "server", "data", "model", "planner", "policy"} <= sections
    assert len(LEAVES) > 150
    assert [leaf[0] for leaf in LEAVES if _bad_values(*leaf) is None] == []  # every field gets bad values


@PROPERTY
@given(st.one_of(bad_overrides, bad_overrides, bad_overrides, unknown_keys, valid_overrides))
def test_experiment_overrides_are_accepted_or_name_the_key(case):
    kind, key, override = case
    if kind == "valid":
        cfg = load_experiment("quickstart", [override])
        assert _plain(_get(cfg, key)) == _plain(_get(QUICKSTART, key)), override
        return
    with pytest.raises(ConfigError) as info:
        load_experiment("quickstart", [override])
    message = str(info.value)
    one_line(message)
    assert type(info.value) is ConfigError, (override, type(info.value))
    assert key in message, (override, message)
    assert re.search(r"expected|did you mean|unknown key|known:|set by the job", message), (override, message)


@pytest.mark.parametrize("override, message", [
    ("online.plan=1", "the command line: online.plan: expected true or false, got 1"),
    ("online.refine_steps=-3", "online.refine_steps: expected >= 0, got -3"),
    ("env.kwargs=[1, 2]", "env.kwargs: expected a mapping, got [1, 2]"),
    ("learner.eps=.nan", "learner.eps: expected a finite number, got nan"),
    ("run_dir=true", "run_dir: expected a string, got True"),
    ("offline.lr=-1", "offline.lr: expected a learning rate > 0, got -1.0"),
    ("offline.warmup_steps=-2", "offline.warmup_steps: expected an integer >= 0, got -2"),
    ("data.benchmark=7", "data.benchmark: data config '7': no file"),
    ("env.name=mars", "env.name: expected one of ['libero', 'lift'] or package.module:Class, got 'mars'"),
    ("learner.schedule.cycle_steps=0", "learner.schedule.cycle_steps: expected more than warmup_steps"),
    ("learner.betas=[0.9, 1.5]", "learner.betas: expected two values in [0, 1), got [0.9, 1.5]"),
])
def test_examples_of_the_config_messages(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment("quickstart", [override])


# =============================================================================================
# 2. Checkpoints
# =============================================================================================
DENOISER, VAE, CONFIG, STATS, TEXT, MANIFEST = ("denoiser.safetensors", "vae.safetensors", "config.yaml",
                                                "dataset_statistics.json", "t5_embeddings.pkl", "manifest.json")
CHECKPOINT_FILES = (DENOISER, VAE, CONFIG, STATS, TEXT, MANIFEST)


@dataclasses.dataclass
class Master:
    """The undamaged checkpoint and its files read once, so each case damages a copy cheaply."""

    path: Path
    work: Path
    weights: dict[str, dict[str, torch.Tensor]]
    config: dict[str, Any]
    stats: dict[str, Any]
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Master:
    root = tmp_path_factory.mktemp("checkpoints")
    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"), seed=0)
    g = torch.Generator().manual_seed(0)
    stats = NormalizationStats.compute(torch.rand(50, 7, generator=g).numpy(), torch.rand(50, 9, generator=g).numpy())
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(32, 16), ["lift the cube"])
    path = save_checkpoint(root / "master", model, stats=stats, text=text, metadata={"step": 3})
    return Master(path=path, work=root, weights={name: load_safetensors((path / name).read_bytes()) for name in (DENOISER, VAE)},
                  config=yaml.safe_load((path / CONFIG).read_text()), stats=json.loads((path / STATS).read_text()),
                  manifest=json.loads((path / MANIFEST).read_text()))


def _copy(master: Master) -> Path:
    """A copy of the checkpoint as hard links: cheap, and safe because ``_rewrite`` never writes into a linked file."""
    target = Path(tempfile.mkdtemp(dir=master.work)) / "ckpt"
    shutil.copytree(master.path, target, copy_function=os.link)
    return target


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # a new inode: the master's file, linked here, stays as it was
    path.write_bytes(data)


def _rehash(ckpt: Path, name: str) -> None:
    """Update the manifest's checksum of ``name``: the damage then reaches the reader instead of the checksum check."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    _rewrite(ckpt / MANIFEST, json.dumps(manifest).encode())


# A damage: (what it does to a copy, returning the key the error must name or None; the file it must name; verify).
Damage = tuple[Callable[[Master, Path], "str | None"], str, bool]


@st.composite
def truncations(draw) -> Damage:
    name = draw(st.sampled_from(CHECKPOINT_FILES))
    # Without the checksums, a config.yaml cut short may still be valid YAML (e.g. "rho: 7.0" cut to "rho: 7."):
    # the checksum is what catches it, so config.yaml is cut with verify on.
    verify = True if name == CONFIG else draw(st.booleans())
    fraction = draw(st.floats(0.0, 1.0, exclude_max=True))

    def damage(master: Master, ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        _rewrite(ckpt / name, data[: min(int(len(data) * fraction), len(data) - 1)])

    return damage, name, verify


@st.composite
def deletions(draw) -> Damage:
    name = draw(st.sampled_from(CHECKPOINT_FILES))
    return (lambda master, ckpt: (ckpt / name).unlink()), name, True


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool]


@st.composite
def weight_damages(draw) -> Damage:
    name = draw(st.sampled_from([DENOISER, VAE]))
    how = draw(st.sampled_from(["missing", "extra", "shape", "dtype"]))
    index = draw(st.integers(0, 10**6))
    extra = "zz_" + draw(words) + ".weight"
    dtype = draw(st.sampled_from(DTYPES))
    grow = draw(st.booleans())

    def damage(master: Master, ckpt: Path) -> str:
        state = dict(master.weights[name])
        key = sorted(state)[index % len(state)]
        tensor = state[key]
        if how == "missing":
            del state[key]
        elif how == "extra":
            state[extra] = torch.zeros(3)
        elif how == "shape":
            flat = tensor.flatten()
            state[key] = torch.cat([flat, flat[:1]]) if grow or flat.numel() < 2 else flat[:-1].clone()
        else:
            state[key] = tensor.to(dtype)
        _rewrite(ckpt / name, save_safetensors(state))
        _rehash(ckpt, name)
        return extra if how == "extra" else key

    return damage, name, True


NOT_JSON_OBJECT = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
                            st.lists(st.integers(), max_size=2))


@st.composite
def manifest_damages(draw) -> Damage:
    field = draw(st.sampled_from(["format", "version", "files", "files.name", "files.digest", "metadata", "whole"]))
    if field == "format":
        value = draw(st.one_of(NOT_JSON_OBJECT, st.dictionaries(words, st.integers(), max_size=1)).filter(
            lambda v: v != CHECKPOINT_FORMAT))
    elif field == "version":
        value = draw(st.one_of(NOT_JSON_OBJECT, st.booleans()).filter(lambda v: isinstance(v, bool) or v != 1))
    elif field == "files":
        value = draw(st.one_of(NOT_JSON_OBJECT, st.just({})))
    elif field == "files.name":
        value = draw(st.sampled_from(["../master/config.yaml", "/etc/hostname", "", "..", "sub/x.bin", MANIFEST]))
    elif field == "files.digest":
        value = draw(st.one_of(NOT_JSON_OBJECT, st.from_regex(r"[0-9A-Fa-z]{1,70}", fullmatch=True)).filter(
            lambda v: not (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v))))
    elif field == "metadata":
        value = draw(NOT_JSON_OBJECT)
    else:
        value = draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=5), st.none()))
    target = draw(st.sampled_from(CHECKPOINT_FILES[:5]))

    def damage(master: Master, ckpt: Path) -> str | None:
        manifest = json.loads(json.dumps(master.manifest))
        if field == "whole":
            manifest = value
        elif field == "files.name":
            manifest["files"][value] = manifest["files"][CONFIG]
        elif field == "files.digest":
            manifest["files"][target] = value
        else:
            manifest[field] = value
        _rewrite(ckpt / MANIFEST, json.dumps(manifest).encode())
        return None if field == "whole" else "files" if field.startswith("files") else field

    return damage, MANIFEST, True


def _leaf_paths(node: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, path + (k,))]
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, path + (i,))]
    return [path]


def _wrong_for(value: Any) -> st.SearchStrategy[Any]:
    """A value of another type than ``value`` (one OmegaConf or our checks cannot convert into it)."""
    if isinstance(value, bool):
        return st.one_of(words, lists, mappings)
    if isinstance(value, int):
        return st.one_of(words, fractions, lists, mappings)
    if isinstance(value, float):
        return st.one_of(words, lists, mappings)
    if isinstance(value, str):
        return st.one_of(lists, mappings)
    if isinstance(value, list):
        return st.one_of(words, st.integers(-5, 5), mappings)
    return st.one_of(words, lists)


@st.composite
def config_damages(draw, master_config: dict[str, Any]) -> Damage:
    whole = draw(st.sampled_from([None, None, None, None, "drop", "not a mapping", "not yaml"]))
    if whole == "drop":
        section = draw(st.sampled_from(["model", "layout"]))

        def damage(master: Master, ckpt: Path) -> str:
            data = {k: v for k, v in master.config.items() if k != section}
            _rewrite(ckpt / CONFIG, yaml.safe_dump(data).encode())
            _rehash(ckpt, CONFIG)
            return section

        return damage, CONFIG, True
    if whole is not None:
        text = draw(st.sampled_from(["- 1\n- 2\n", "just text\n", "model: [unclosed\n", "model: {a: 1\n", "\tmodel: 1\n"]))

        def damage(master: Master, ckpt: Path) -> None:
            _rewrite(ckpt / CONFIG, text.encode())
            _rehash(ckpt, CONFIG)

        return damage, CONFIG, True
    path = draw(st.sampled_from(_leaf_paths(master_config)))
    slot_field = path[:2] == ("layout", "slots")
    if slot_field and path[-1] in ("kind", "time"):
        value = draw(st.one_of(words, st.integers(-5, 5), lists))
    else:
        current = master_config
        for part in path:
            current = current[part]
        value = draw(_wrong_for(current))

    def damage(master: Master, ckpt: Path) -> str:
        data = json.loads(json.dumps(master.config))
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        _rewrite(ckpt / CONFIG, yaml.safe_dump(data).encode())
        _rehash(ckpt, CONFIG)
        return str(path[-1])

    return damage, CONFIG, True


STAT_KEYS = [f"{g}_{s}" for g in ("actions", "proprio") for s in ("min", "max", "mean", "std", "median")]


@st.composite
def stats_damages(draw) -> Damage:
    key = draw(st.sampled_from(STAT_KEYS))
    how = draw(st.sampled_from(["drop", "shorter", "longer", "not numbers", "nan", "scalar"]))
    assume(not (how == "drop" and not key.endswith(("_min", "_max"))))  # mean, std, median are optional

    def damage(master: Master, ckpt: Path) -> str:
        data = json.loads(json.dumps(master.stats))
        if how == "drop":
            del data[key]
        elif how == "shorter":
            data[key] = data[key][:-1]
        elif how == "longer":
            data[key] = data[key] + [0.5]
        elif how == "not numbers":
            data[key] = ["x"] * len(data[key])
        elif how == "nan":
            data[key] = [float("nan")] + data[key][1:]
        else:
            data[key] = 0.5
        _rewrite(ckpt / STATS, json.dumps(data).encode())
        _rehash(ckpt, STATS)
        return key

    return damage, STATS, True


@st.composite
def text_damages(draw) -> Damage:
    how = draw(st.sampled_from(["shape", "not a tensor", "not a dict", "key"]))
    shape = draw(st.tuples(st.integers(1, 20), st.integers(1, 40)).filter(lambda s: s != (16, 32)))

    def damage(master: Master, ckpt: Path) -> str | None:
        data: Any = {"lift the cube": torch.zeros(1, *shape, dtype=torch.bfloat16)}
        if how == "not a tensor":
            data = {"lift the cube": [1.0, 2.0]}
        elif how == "not a dict":
            data = [torch.zeros(16, 32)]
        elif how == "key":
            data = {7: torch.zeros(1, 16, 32)}
        _rewrite(ckpt / TEXT, pickle.dumps(data))
        _rehash(ckpt, TEXT)
        return "lift the cube" if how in ("shape", "not a tensor") else None

    return damage, TEXT, True


def checkpoint_damages(master_config: dict[str, Any]) -> st.SearchStrategy[Damage]:
    return st.one_of(truncations(), deletions(), weight_damages(), weight_damages(), manifest_damages(),
                     config_damages(master_config), stats_damages(), text_damages())


# What the checkpoint's config.yaml holds (the strategy draws the leaf to damage from it).
SAVED_CONFIG = json.loads(json.dumps({"model": model_config_to_dict(load_model_config("tiny")),
                                      "layout": load_layout("libero").to_dict()}))


@PROPERTY
@given(damage=checkpoint_damages(SAVED_CONFIG))
def test_damaged_checkpoints_are_clear_errors(checkpoint, damage):
    apply, name, verify = damage
    ckpt = _copy(checkpoint)
    try:
        key = apply(checkpoint, ckpt)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(ckpt, verify=verify)
    finally:
        shutil.rmtree(ckpt.parent)
    message = str(info.value)
    one_line(message)
    assert name in message, (name, key, message)
    if key is not None:
        assert key in message, (name, key, message)


def _with_manifest(field: str, value: Any) -> Callable[[Master, Path], None]:
    def damage(master: Master, ckpt: Path) -> None:
        _rewrite(ckpt / MANIFEST, json.dumps({**master.manifest, field: value}).encode())
    return damage


def _with_weight(key: str, tensor: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Master, Path], None]:
    def damage(master: Master, ckpt: Path) -> None:
        _rewrite(ckpt / DENOISER, save_safetensors({**master.weights[DENOISER], key: tensor(master.weights[DENOISER][key])}))
        _rehash(ckpt, DENOISER)
    return damage


def _with_proprio_dims(dims: int) -> Callable[[Master, Path], None]:
    def damage(master: Master, ckpt: Path) -> None:  # consistent statistics, of another robot's proprio
        stats = {key: value[:dims] if key.startswith("proprio") else value for key, value in master.stats.items()}
        _rewrite(ckpt / STATS, json.dumps(stats).encode())
        _rehash(ckpt, STATS)
    return damage


@pytest.mark.parametrize("damage, message", [
    (_with_manifest("version", "1"), "manifest.json: key 'version': expected 1, got '1'"),
    (_with_manifest("files", {"../x": "0" * 64}), "manifest.json: key 'files': expected names of files in the checkpoint directory"),
    (_with_weight("proj_out.weight", lambda t: t.double()),
     "denoiser.safetensors: weights do not match the model config: 1 with other dtypes (e.g. [\"proj_out.weight: file torch.float64"),
    (_with_weight("proj_out.weight", lambda t: t.int()), "1 with other dtypes (e.g. ['proj_out.weight: file torch.int32 vs model torch.float32'])"),
    (_with_proprio_dims(5), "dataset_statistics.json: key 'proprio_min': expected 9 values (the layout's proprio_dim), got 5"),
])
def test_examples_of_the_checkpoint_messages(checkpoint, damage, message):
    ckpt = _copy(checkpoint)
    damage(checkpoint, ckpt)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(ckpt)


def test_an_undamaged_copy_loads(checkpoint):
    """Run after the property: the master, shared by hard links with every damaged copy, is intact (checksums verified)."""
    ckpt = _copy(checkpoint)
    loaded = load_checkpoint(ckpt)
    assert loaded.metadata == {"step": 3} and loaded.text.shape == (16, 32) and loaded.stats.action_dim == 7
    assert checkpoint.config == SAVED_CONFIG  # the strategy damaged the leaves the file has


# =============================================================================================
# 3. Episode files
# =============================================================================================
STEPS, CANDIDATES, QUERIES = 6, 3, 2


@dataclasses.dataclass
class EpisodeMaster:
    path: Path
    work: Path


@pytest.fixture(scope="module")
def episode_file(tmp_path_factory) -> EpisodeMaster:
    root = tmp_path_factory.mktemp("episodes")
    rng = np.random.default_rng(0)
    recorder = EpisodeRecorder(["primary", "wrist"])
    for t in range(STEPS):
        frames = {c: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for c in ("primary", "wrist")} if t % 2 == 0 else {}
        recorder.add(frames, rng.normal(size=9), rng.normal(size=7), timestamp=1.7e9 + t * 0.05)
        if t in (0, 3):
            recorder.planner.append(PlannerQuery(step=t, candidate_values=rng.random(CANDIDATES), chosen=1,
                                                 candidate_actions=rng.normal(size=(CANDIDATES, 4, 7))))
    episode = recorder.episode(instruction="lift the cube", success=True, task="lift", score=0.75, source=Source.SIM, seed=7,
                               policy_version=2, planning_version=3, initial_state=rng.normal(size=12), metadata={"trial": 1})
    path = write_episode(root / "master.hdf5", episode)
    assert read_episode(path).num_steps == STEPS
    return EpisodeMaster(path=path, work=root)


REQUIRED_DATASETS = ["proprio", "actions", "planner/step", "planner/chosen", "planner/candidate_values"]
OPTIONAL_DATASETS = ["timestamps", "initial_state", "planner", "planner/candidate_actions", "primary_images_jpeg", "wrist_images_jpeg"]
ARRAY_DATASETS = ["proprio", "actions", "timestamps", "initial_state", "planner/step", "planner/chosen", "planner/candidate_values",
                  "planner/candidate_actions", "primary_images_jpeg"]
ATTRIBUTES = ["success", "task_description", "task", "score", "source", "interrupted", "metadata", "episode_id", "seed",
              "policy_version", "planning_version", "format", "format_version"]
REQUIRED_ATTRIBUTES = {"success", "task_description", "format_version"}  # format_version: with our format attribute


def _finite(arr: np.ndarray, dtype: type) -> bool:
    with np.errstate(over="ignore"):  # a float64 beyond float32's range is not a finite float32
        return bool(np.all(np.isfinite(arr.astype(dtype))))


def _valid_array(name: str, arr: np.ndarray) -> bool:
    """Whether ``arr`` in place of dataset ``name`` still makes a valid episode (the reader must then accept it).

    Proprio, actions and the planner's numbers are held as float32, timestamps and the initial state as float64:
    values must be finite in that type."""
    wide = name in ("timestamps", "initial_state")
    numeric = arr.dtype.kind in "fiu" and _finite(arr, np.float64 if wide else np.float32)
    if name.endswith(IMAGE_SUFFIX):  # JPEG bytes: a string dataset of empty frames (none rendered) is still one
        return arr.dtype.kind == "S" and arr.shape == (STEPS,) and all(item == b"" for item in arr)
    if name in ("proprio", "actions"):
        return numeric and arr.ndim == 2 and arr.shape[0] == STEPS  # (steps, 0): a robot without proprio
    if name == "timestamps":
        return numeric and arr.shape == (STEPS,)
    if name == "initial_state":
        return numeric and arr.ndim == 1
    if name in ("planner/step", "planner/chosen"):
        limit = STEPS if name.endswith("step") else CANDIDATES
        return arr.dtype.kind in "iu" and arr.shape == (QUERIES,) and bool(np.all((arr >= 0) & (arr < limit)))
    if name == "planner/candidate_values":
        return numeric and arr.shape == (QUERIES, CANDIDATES)
    if name == "planner/candidate_actions":
        return numeric and arr.ndim == 4 and arr.shape[:2] == (QUERIES, CANDIDATES)
    raise AssertionError(name)


def _text(value: Any) -> str | None:
    """UTF-8 text, as the reader takes it: a str without surrogates, or bytes that decode."""
    try:
        text = value.decode() if isinstance(value, bytes) else value
        if isinstance(text, str):
            text.encode()  # a str with surrogates (undecodable bytes, as h5py hands them back) fails here
            return text
    except UnicodeError:
        pass
    return None


def _valid_attribute(name: str, value: Any) -> bool:
    """Whether ``value`` (as h5py hands it back) is a valid value of attribute ``name``."""
    if isinstance(value, np.ndarray):
        return False
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if name in ("success", "interrupted"):
        return isinstance(value, (bool, np.bool_)) or (is_int and value in (0, 1))
    if name in ("task_description", "task"):
        return _text(value) is not None
    if name == "episode_id":
        return bool(_text(value))
    if name == "score":
        return (is_int or isinstance(value, (float, np.floating))) and math.isfinite(value)
    if name == "source":
        return _text(value) in [s.value for s in Source]
    if name in ("seed", "policy_version", "planning_version"):
        return is_int and value >= 0
    if name == "metadata":
        try:
            return _text(value) is not None and isinstance(json.loads(_text(value)), dict)
        except ValueError:
            return False
    if name == "format":
        return _text(value) == EPISODE_FORMAT
    if name == "format_version":
        return is_int and value == 1
    raise AssertionError(name)


array_dtypes = st.sampled_from([np.bool_, np.int8, np.int64, np.uint8, np.float16, np.float32, np.float64, np.complex64, "S3"])
arrays = array_dtypes.flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)))
attribute_values = st.one_of(
    st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8).filter(lambda s: "\x00" not in s),
    st.sampled_from(["sim", "demo", "robot", "{}", '{"a": 1}', "[1]", "null", "yes", EPISODE_FORMAT]),
    st.binary(min_size=1, max_size=4).filter(lambda b: b"\x00" not in b), hnp.arrays(np.int64, st.integers(1, 3)),
)


@st.composite
def episode_damages(draw):
    kind = draw(st.sampled_from(["delete dataset", "delete attribute", "replace dataset", "replace dataset", "attribute",
                                 "attribute", "truncate"]))
    if kind == "delete dataset":
        return kind, draw(st.sampled_from(REQUIRED_DATASETS + OPTIONAL_DATASETS)), None
    if kind == "delete attribute":
        return kind, draw(st.sampled_from(ATTRIBUTES)), None
    if kind == "replace dataset":
        return kind, draw(st.sampled_from(ARRAY_DATASETS)), draw(arrays)
    if kind == "attribute":
        return kind, draw(st.sampled_from(ATTRIBUTES)), draw(attribute_values)
    return kind, None, draw(st.floats(0.0, 1.0, exclude_max=True))


@PROPERTY
@given(damage=episode_damages())
def test_damaged_episode_files_are_clear_errors(episode_file, damage):
    kind, name, value = damage
    path = Path(tempfile.mkdtemp(dir=episode_file.work)) / "episode.hdf5"
    shutil.copyfile(episode_file.path, path)
    try:
        if kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: min(int(len(data) * value), len(data) - 1)])
            valid = False
        else:
            with h5py.File(path, "a") as f:
                if kind == "delete dataset":
                    del f[name]
                    valid = name in OPTIONAL_DATASETS
                elif kind == "delete attribute":
                    del f.attrs[name]
                    valid = name not in REQUIRED_ATTRIBUTES
                elif kind == "replace dataset":
                    del f[name]
                    f.create_dataset(name, data=value)
                    valid = _valid_array(name, value)
                else:
                    f.attrs[name] = value
                    valid = _valid_attribute(name, f.attrs[name])  # as h5py hands it back
        if valid:
            read_episode(path)  # what is left is a valid episode: it reads
            return
        with pytest.raises(EpisodeFileError) as info:
            read_episode(path)
    finally:
        shutil.rmtree(path.parent)
    message = str(info.value)
    one_line(message)
    assert str(path) in message, (damage, message)
    if name is not None:
        field = name.split("/")[-1]
        assert field in message, (damage, message)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.attrs.__setitem__("success", "yes"), "episode.hdf5: attribute 'success': expected a bool, got 'yes'"),
    (lambda f: f.attrs.__setitem__("seed", 2.5), "episode.hdf5: attribute 'seed': expected an integer >= 0, got np.float64(2.5)"),
    (lambda f: (f.__delitem__("planner/chosen"), f.create_dataset("planner/chosen", data=np.zeros(5, np.int64))),
     "episode.hdf5:/planner/chosen: expected 2 rows (one per query, as planner/step), got 5"),
    (lambda f: (f.__delitem__("timestamps"), f.create_dataset("timestamps", data=np.array([b"x"] * STEPS))),
     "episode.hdf5:/timestamps: expected a 1-D numeric dataset, got shape (6,) dtype |S1"),
])
def test_examples_of_the_episode_file_messages(episode_file, tmp_path, edit, message):
    path = tmp_path / "episode.hdf5"
    shutil.copyfile(episode_file.path, path)
    with h5py.File(path, "a") as f:
        edit(f)
    with pytest.raises(EpisodeFileError, match=re.escape(message)):
        read_episode(path)


def test_an_undamaged_episode_file_reads(episode_file):
    episode = read_episode(episode_file.path)
    assert (episode.num_steps, episode.seed, episode.score, len(episode.planner)) == (STEPS, 7, 0.75, QUERIES)
