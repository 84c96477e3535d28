#!/usr/bin/env bash
# Make docs/images/clean-sixel.png: `fastclass clean --order loss --run 1` on the demo catalog in a real
# sixel terminal (xterm as a VT340 on a virtual screen), photographed from the X server.
# Needs `make demo` first and Debian's xvfb, xterm, x11-apps (xwd) and imagemagick (convert).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
display=:$((90 + RANDOM % 100))
Xvfb "$display" -screen 0 1280x900x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $xvfb 2>/dev/null' EXIT
sleep 2
DISPLAY=$display xterm -ti vt340 -xrm 'XTerm*decTerminalID: vt340' -xrm 'XTerm*numColorRegisters: 256' \
  -geometry 110x40 -fa Monospace -fs 10 -e env FASTCLASS_PREVIEW=sixel FASTCLASS_REVIEWER=docs \
  "$root/.venv/bin/fastclass" --catalog "$root/demo/fastclass.db" clean --order loss --run 1 &
sleep 15
xwd -root -display "$display" -silent > /tmp/fastclass-sixel.xwd
convert /tmp/fastclass-sixel.xwd -crop 1106x620+0+0 docs/images/clean-sixel.png
kill %2 2>/dev/null || true
echo "wrote docs/images/clean-sixel.png"
