#!/usr/bin/env bash
# A screenshot of the real app window, reproducible anywhere: a virtual X server (Xvfb), the
# app on whatever adapter wgpu finds there (lavapipe without a GPU), the Generate panel after
# generating four images with the tiny untrained model (examples/tiny_sd.rs), captured with
# ImageMagick's `import`. Its settings live in target/screenshot, not in the user's config.
#
#   tools/screenshot.sh [OUT.png]          # default docs/app-screenshot.png
#
# Needs (Debian names): xvfb xauth imagemagick libxkbcommon0 libxkbcommon-x11-0 libxcursor1
# libxi6 libx11-xcb1 libfontconfig1, and mesa-vulkan-drivers without a GPU.
# PANEL=train|pool|... shows another panel; WAIT_SECONDS (default 25) is the time given to
# the job before the capture.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/app-screenshot.png}
work=target/screenshot
cargo build --release --bin stablerep --example tiny_sd
rm -rf "$work"
mkdir -p "$work" "$(dirname "$out")"
target/release/examples/tiny_sd "$work/model" >/dev/null
cat > "$work/settings.json" <<JSON
{"generate": {"images": 4, "sweep": "1 3 7.5", "save_dir": "$work/saved",
  "sampling": {"steps": 20, "size": 64, "sampler": "dpmpp-2m-karras", "seed": 7}}}
JSON
display=:${DISPLAY_NUMBER:-97}
app=
Xvfb "$display" -screen 0 1200x820x24 -nolisten tcp &
xvfb=$!
trap 'kill $app $xvfb 2>/dev/null || true' EXIT
sleep 2
DISPLAY=$display XDG_RUNTIME_DIR=$(mktemp -d) WGPU_BACKEND=${WGPU_BACKEND:-vulkan} \
    target/release/stablerep app --settings "$work/settings.json" --panel "${PANEL:-generate}" \
    --model "$work/model" --prompt "a red cube on a wooden table" --start &
app=$!
sleep "${WAIT_SECONDS:-25}"
if ! kill -0 "$app" 2>/dev/null; then
    echo "the app exited before the capture" >&2
    exit 1
fi
import -display "$display" -window root "$out"
echo "wrote $out"
