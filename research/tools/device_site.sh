#!/bin/bash
# Packs Ray, robosuite and MuJoCo (with what they import) for a GPU host that has no package index
# and takes at most 64 MiB of files per call (this project's rented H200s): Ray's wheel alone is
# 79 MB and robosuite's 193 MB, so both are trimmed to what the main job on the built-in task uses.
#
# Ray: no Java jar (32 MB), no libraries above Ray core (rllib, data, serve, train, tune, llm), no
# dashboard web client, debug symbols stripped from its three native binaries. robosuite: only the
# XML models and the meshes and textures that the Lift scene with a Panda arm loads (the list is
# read from the compiled scene here). The result is a tar.xz of a site-packages folder (about
# 37 MB) for CPython 3.12 on x86-64 Linux, unpacked on the host with `tar -xJf ... -C /tmp/site`.
#
# RAY=0 leaves Ray and what only Ray imports out (about 14 MB): enough for the Ray-free entry points
# (launch/collect.py, launch/train.py, bench/gpu_branch_judge.sh), which is what a GPU host needs.
#
#   bash research/tools/device_site.sh [out.tar.xz]    # needs the project's .venv (robosuite) and network access to PyPI
set -euo pipefail
out=$(realpath -m "${1:-.carry/site.tar.xz}")
root=$(cd "$(dirname "$0")/../.." && pwd)  # the repository (this script lives in research/tools/)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels" "$work/site" "$(dirname "$out")"
pkgs=(robosuite==1.4.0 mujoco==3.3.7 termcolor PyOpenGL)
if [ "${RAY:-1}" != 0 ]; then
  pkgs+=("ray==$("$root/.venv/bin/python" -c "import ray; print(ray.__version__)")" jsonschema jsonschema-specifications referencing rpds-py)
fi
for pkg in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work/wheels" "$pkg"
done
(cd "$work/site" && for w in "$work"/wheels/*.whl; do unzip -q -o "$w"; done)
cd "$work/site"
rm -rf ray/jars ray/rllib ray/data ray/serve ray/llm ray/train ray/tune ray/dashboard/client/build \
  robosuite/models/assets/bullet_data robosuite/models/assets/demonstrations
[ -d ray ] && strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
test -f OpenGL/__init__.py || { echo "PyOpenGL missing from the bundle (MuJoCo's EGL context imports it)" >&2; exit 1; }
# The files the Lift scene loads, from the compiled model of the project's own LiftEnv.
ROOT="$root" MUJOCO_GL=${MUJOCO_GL:-egl} "$root/.venv/bin/python" - "$work/site/robosuite" <<'EOF'
import os, re, sys
sys.path.insert(0, os.environ.get("ROOT", "."))
import robosuite
from actors.envs.lift import LiftEnv
env = LiftEnv(image_size=16, num_initial_states=1)
base = os.path.dirname(robosuite.__file__)
keep = {os.path.relpath(os.path.realpath(f), base) for f in re.findall(r'file="([^"]+)"', env._env.sim.model.get_xml())}
env.close()
target = sys.argv[1]
for folder, _, files in os.walk(os.path.join(target, "models", "assets")):
    for name in files:
        path = os.path.join(folder, name)
        if not name.endswith(".xml") and os.path.relpath(path, target) not in keep:
            os.remove(path)
EOF
find . -name __pycache__ -type d -prune -exec rm -rf {} +
tar -cf - . | xz -6 -T0 > "$out"
echo "wrote $out ($(du -h "$out" | cut -f1))"
