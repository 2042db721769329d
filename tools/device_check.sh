#!/usr/bin/env bash
# The GPU check for the first lent device (issue 13, item 5); docs/device-check.md says what
# it measures and how to call it. Usage:
#
#   tools/device_check.sh [--dry] [OUT_DIR]     # OUT_DIR: default $OUT, else /tmp/device-check
#   tools/device_check.sh --fetch-wheels        # here, before the lease: fill .whl/ (carried)
#
# Writes OUT_DIR/device-check.json, device-check.md and device-check.log, nothing else there:
# the device tool brings back what lies under $OUT, at most 8 files. Every step is timed and
# may fail without stopping the rest. Without CUDA (or with --dry) each CUDA step is recorded
# as skipped with the exact command it would have run, and cheap CPU versions of the same
# commands run instead, so the script is known to start before a GPU is ever lent.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}  # on the lent device, python3 is the interpreter that has torch
budget_s=${DEVICE_CHECK_BUDGET_S:-450}  # all steps; the issue allows 8 minutes
only=${DEVICE_CHECK_STEPS:-}  # e.g. "e2e-package e2e-bench": a rerun of some steps only
read -ra e2e_flags <<<"${DEVICE_CHECK_E2E_FLAGS:-}"  # more `musc-edge bench` options
reserve_s=10  # kept back for the final report
dry=0
fetch=0
out_dir=""
for arg in "$@"; do
  case $arg in
    --dry) dry=1 ;;
    --fetch-wheels) fetch=1 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) out_dir=$arg ;;
  esac
done

# The device has no network and lacks pydantic and platformdirs (core dependencies) and
# open_clip (the paper's CLIP tower), so their wheels travel in .whl/ (git-ignored; name it
# in the run's `carry`). The versions are this machine's, which the tests pass with.
wheels_dir=${DEVICE_CHECK_WHEELS:-$repo/.whl}
if ((fetch)); then
  wheels=(pydantic pydantic_core annotated_types typing_inspection typing_extensions
    platformdirs open_clip_torch ftfy wcwidth)
  pins=()
  version='import importlib.metadata as m, sys; print(m.version(sys.argv[1]))'
  for name in "${wheels[@]}"; do pins+=("$name==$("$python" -c "$version" "$name")"); done
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels_dir" "${pins[@]}"
  ls -l "$wheels_dir"
  exit 0
fi

out_dir=${out_dir:-${OUT:-/tmp/device-check}}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
log="$out_dir/device-check.log"
: >"$log"
work=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")  # step data stays out of $OUT
steps="$work/steps"
data="$work/data"
mkdir -p "$steps" "$data" "$work/logs" "$work/bin"
trap 'rm -rf "$work"' EXIT

say() { echo "[device-check $(date +%H:%M:%S)] $*" | tee -a "$log"; }
report() {
  "$python" "$repo/tools/device_report.py" write --steps "$steps" --out "$out_dir" \
    --mode "$mode" "$@"
}

# musc_edge cannot be imported from the tree with a plain PYTHONPATH: setuptools maps
# runtime/, models/, export/ and configs/ into it (pyproject's package-dir). `pip install -e`
# would need setuptools on the device and, here, would replace this machine's own install.
# A folder of symlinks laid out like the installed package needs neither, behaves the same
# here and there, and so is what the dry run tests. Commands run from $work, never from the
# repo, so the tree's bare musc_edge/ is not found first through the current directory.
pkg="$work/py/musc_edge"
mkdir -p "$pkg"
for entry in "$repo"/musc_edge/*; do
  [[ $(basename "$entry") == __pycache__ ]] || ln -s "$entry" "$pkg/"
done
for sub in runtime models export configs; do ln -s "$repo/$sub" "$pkg/$sub"; done
ln -s "$repo/tests" "$work/py/tests"  # `from tests.oracle import ...` in the CUDA tests
export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
# `musc-edge` as the docs spell it, whatever is installed: a launcher on this tree.
printf '#!%s\nfrom musc_edge.cli import app\napp(prog_name="musc-edge")\n' \
  "$(command -v "$python")" >"$work/bin/musc-edge"
chmod +x "$work/bin/musc-edge"
export PATH="$work/bin:$PATH"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# Carried wheels go in only where something is missing, into a folder of their own.
setup_note="nothing to install"
if ! (cd "$work" && "$python" -c "import pydantic, platformdirs, open_clip" 2>/dev/null); then
  if compgen -G "$wheels_dir/*.whl" >/dev/null; then
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$work/site" "$wheels_dir"/*.whl >>"$log" 2>&1; then
      export PYTHONPATH="$PYTHONPATH:$work/site"
      setup_note="installed .whl/ into \$WORK/site"
    else
      setup_note="pip install of .whl/ failed (see the log)"
    fi
  else
    setup_note="pydantic, platformdirs or open_clip missing and no .whl/ carried"
  fi
fi

if ((dry)); then
  mode=dry reason="--dry"
elif (cd "$work" && "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())") \
  2>>"$log"; then
  mode=gpu reason=""
else
  mode=dry reason="no CUDA device"
fi
say "mode $mode${reason:+ ($reason)}, out $out_dir, work $work, setup: $setup_note"

# step NAME CAP_S DATA_FILE CMD...: runs CMD from $work under `timeout`, within what is left
# of the budget, and records status, seconds, the command and the data file it wrote.
step() {
  local name=$1 cap=$2 file=$3
  shift 3
  local command left limit started rc=0 status
  command=$(printf '%q ' "$@")
  command=${command% }
  command=${command//"$work"/\$WORK}  # readable, and the same on every run
  if [[ -n $only && " $only " != *" $name "* && $name != environment ]]; then
    record "$name" skipped 0 "" "$command" "" "not in DEVICE_CHECK_STEPS"
    return 0
  fi
  left=$((budget_s - SECONDS - reserve_s))
  if ((left < 15)); then
    say "$name: skipped, out of the ${budget_s} s budget"
    record "$name" skipped 0 "" "$command" "" "out of the ${budget_s} s budget"
    return 0
  fi
  limit=$((cap < left ? cap : left))
  say "$name: $command (limit ${limit} s)"
  started=$(date +%s%N)
  (cd "$work" && timeout --kill-after=10 "$limit" "$@") >"$work/logs/$name.log" 2>&1 || rc=$?
  local ms=$((($(date +%s%N) - started) / 1000000))
  case $rc in
    0) status=passed ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  { echo "----- $name (rc $rc, ${ms} ms): $command"; cat "$work/logs/$name.log"; } >>"$log"
  if [[ $status != passed ]]; then tail -n 15 "$work/logs/$name.log"; fi
  say "$name: $status in $((ms / 1000)) s"
  record "$name" "$status" "$ms" "$rc" "$command" "$file" "" "$work/logs/$name.log"
  # After every step: a run cut short still brings back what it measured.
  report || say "the report writer failed (see the log)"
}

# skip NAME COMMAND...: a CUDA step this machine cannot run, recorded with its command.
skip() {
  local name=$1 command
  shift
  command=$(printf '%q ' "$@")
  command=${command% }
  command=${command//"$work"/\$WORK}
  say "$name: skipped ($reason): $command"
  record "$name" skipped 0 "" "$command" "" "$reason"
}

# record NAME STATUS MS RC COMMAND [DATA REASON LOG]; a failure here must not end the check.
record() {
  "$python" "$repo/tools/device_report.py" record --steps "$steps" --name "$1" --status "$2" \
    --ms "$3" ${4:+--rc "$4"} --command="$5" --data="${6:-}" --reason="${7:-}" \
    --log="${8:-}" || say "recording step $1 failed"
}

# The commands, the same in both modes; only the CUDA ones are skipped in a dry run.
cuda_tests=("$python" -m pytest -q -p no:cacheprovider --import-mode=importlib
  --rootdir "$repo" -c "$repo/pyproject.toml" -k "cuda or gpu" "$repo/tests/test_msm.py")
msm_args=(--device cuda --n 200 --grid 37 --dim 1024 --sets 12 --runs 1)
e2e_package=("$python" "$repo/tools/device_package.py" --backbone auto --image-size 518
  --out "$work/pkg" --json "$data/e2e-package.json")
# Ours: the torch runner with the backbone in bf16 (autocast) and MSM in bf16, against the
# original (fp32 backbone, cdist MSM) on the same 200 images. One warm-up run each; the
# original's runs are the long part (~45 s each).
e2e_bench=(musc-edge bench --model "$work/pkg" --synthetic --batch-size 200 --engine torch
  --backbone-precision bf16 --msm-precision bf16 --compare-original --runs 1 --warmup 1
  --json "$data/e2e-bench.json"
  ${e2e_flags[@]+"${e2e_flags[@]}"})

step environment 60 "$data/environment.json" \
  "$python" "$repo/tools/device_report.py" env --json "$data/environment.json"
if [[ $mode == gpu ]]; then
  # Order: what matters most first, so a budget cut falls on the fp32 MSM (exactness only).
  step cuda-tests 150 "$data/cuda-tests.xml" "${cuda_tests[@]}" --junitxml "$data/cuda-tests.xml"
  step msm-bf16 120 "$data/msm-bf16.json" \
    musc-edge bench msm "${msm_args[@]}" --msm-precision bf16 --json "$data/msm-bf16.json"
  step e2e-package 120 "$data/e2e-package.json" "${e2e_package[@]}"
  step e2e-bench 300 "$data/e2e-bench.json" "${e2e_bench[@]}"
  step msm-fp32 150 "$data/msm-fp32.json" \
    musc-edge bench msm "${msm_args[@]}" --msm-precision fp32 --json "$data/msm-fp32.json"
else
  skip cuda-tests "${cuda_tests[@]}" --junitxml "$data/cuda-tests.xml"
  skip msm-bf16 \
    musc-edge bench msm "${msm_args[@]}" --msm-precision bf16 --json "$data/msm-bf16.json"
  skip e2e-package "${e2e_package[@]}"
  skip e2e-bench "${e2e_bench[@]}"
  skip msm-fp32 \
    musc-edge bench msm "${msm_args[@]}" --msm-precision fp32 --json "$data/msm-fp32.json"
  # The same command lines, small and on the CPU: imports, options and the package writer.
  step cpu-pytest 120 "$data/cpu-pytest.xml" "${cuda_tests[@]}" --junitxml "$data/cpu-pytest.xml"
  step cpu-msm 120 "$data/cpu-msm.json" musc-edge bench msm --device cpu --n 8 --grid 8 \
    --dim 64 --sets 2 --runs 1 --msm-precision bf16 --json "$data/cpu-msm.json"
  step cpu-package 120 "$data/cpu-package.json" "$python" "$repo/tools/device_package.py" \
    --backbone dinov2-vits14 --image-size 56 --out "$work/pkg-cpu" --json "$data/cpu-package.json"
  step cpu-e2e 120 "$data/cpu-e2e.json" musc-edge bench --model "$work/pkg-cpu" --synthetic \
    --batch-size 4 --engine torch --msm-precision bf16 --compare-original --runs 1 --warmup 0 \
    --json "$data/cpu-e2e.json"
fi
report --final
say "done in ${SECONDS} s: $out_dir/device-check.md"
cat "$out_dir/device-check.md"
