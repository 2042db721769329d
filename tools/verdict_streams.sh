#!/usr/bin/env bash
# The measurements behind docs/verdicts.md: a calibration from 20 train/good bottle images,
# then every line-like stream through `musc-edge run`'s loop, calibrated and not, and the
# few-shot evaluation. Usage: tools/verdict_streams.sh [OUT_DIR] (default /tmp/musc-verdicts).
set -euo pipefail
out=${1:-/tmp/musc-verdicts}
data=${MUSC_DATA:-"$(dirname "$0")/../../shared/data/mvtec_ad"}
mkdir -p "$out"
package="$out/dinov2-vits14-224"
[ -f "$package/musc.json" ] || musc-edge export --backbone dinov2-vits14 --image-size 224 --out "$package"
musc-edge calibrate --model "$package" --good "$data/bottle/train/good" --parts 20 \
  --out "$out/bottle-20.cal.safetensors"
musc-edge calibrate --model "$package" --good "$data/bottle/train/good" --parts 20 --aligned \
  --out "$out/bottle-20-aligned.cal.safetensors"
streams=(--stream grouped --stream shuffled --stream defects-first --stream repeated)
modes=(--mode batch --mode rolling)
musc-edge bench line --model "$package" --root "$data" "${streams[@]}" --stream mixed \
  --stream drift "${modes[@]}" --calibration "$out/bottle-20.cal.safetensors" \
  --json "$out/calibrated.json"
musc-edge bench line --model "$package" --root "$data" "${streams[@]}" "${modes[@]}" \
  --json "$out/uncalibrated.json"
musc-edge bench line --model "$package" --root "$data" --stream mixed --stream drift "${modes[@]}" \
  --calibration "$out/bottle-20.cal.safetensors" --refresh-references 20 \
  --json "$out/refreshed.json"
musc-edge bench line --model "$package" --root "$data" "${streams[@]}" "${modes[@]}" \
  --calibration "$out/bottle-20-aligned.cal.safetensors" --json "$out/aligned.json"
musc-edge bench line --model "$package" --root "$data" --stream mixed --stream drift --mode batch \
  --calibration "$out/bottle-20-aligned.cal.safetensors" --refresh-references 20 \
  --json "$out/aligned-refreshed.json"
musc-edge eval --root "$data" --category bottle --shots 0,1,4,10 --json "$out/few-shot.json"
