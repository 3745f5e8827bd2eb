#!/usr/bin/env bash
# The README's pictures of `attend viz`: one page from the tiny BERT checkpoint of fixtures/hf (a text pair), each
# view screenshotted by headless Chromium (Debian's `chromium`) into docs/viz/, and the image view of the tiny ViT on
# the generated picture of fixtures/viz. The tiny models' weights are random, so the pictures show what the views
# look like, not what a trained model attends to.
#   bash scripts/viz_screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p attend-cli
mkdir -p docs/viz
page=$(mktemp -d)/bert.html
./target/release/attend viz --model fixtures/hf/bert --text "the quick brown fox jumps over the lazy dog" \
  --pair "a lazy dog sleeps" --out "$page"
profile=$(mktemp -d)
for view in head model rollout summary; do
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run \
    --user-data-dir="$profile" --hide-scrollbars --window-size=1000,760 \
    --screenshot="docs/viz/$view.png" "file://$page#$view" 2>/dev/null
  echo "docs/viz/$view.png"
done
vit=$(dirname "$page")/vit.html
./target/release/attend viz --model fixtures/hf/vit --image fixtures/viz/vit_image.png --out "$vit"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1000,760 \
  --screenshot="docs/viz/image.png" "file://$vit#image" 2>/dev/null
echo "docs/viz/image.png"
rm -rf "$profile" "$(dirname "$page")"
