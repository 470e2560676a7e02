#!/usr/bin/env bash
# Builds the corpus the shipped teacher was trained on (configs/teacher_realnoise.toml, issue 25):
# 50 espeak-ng voices, the 6 ktuberling "train" speakers and the Hedgewars voice packs (Robot left out),
# 60% of the files mixed with recorded noise from Debian packages (pycosdist.denoise.recorded_noise),
# the held-out Wesnoth ambiences never in the training split.
#   usage: scripts/build_teacher_corpus.sh [OUT (default data/teacher_corpus)] [PACKAGES_DIR (default data/debs)]
#   RECORDED_FRACTION=0.9 scripts/build_teacher_corpus.sh ...   (share of files with recorded noise, default 0.6)
# The packages are downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into PACKAGES_DIR
# (about 3.5 GB; no root needed, nothing is installed system-wide). ktuberling-data must be installed
# (`apt-get install ktuberling-data`) for the recorded training voices.
set -euo pipefail
OUT=${1:-data/teacher_corpus}
PKGS_DIR=${2:-data/debs}
PYCOSDIST=${PYCOSDIST:-.venv/bin/pycosdist}
PACKAGES="0ad-data flightgear-data-base supertuxkart-data lincity-ng-data hedgewars-data warzone2100-data
          freeciv-data sound-theme-freedesktop frozen-bubble-data wesnoth-1.16-data"
mkdir -p "$PKGS_DIR"
for p in $PACKAGES; do
  if [ ! -d "$PKGS_DIR/$p" ]; then
    (cd "$PKGS_DIR" && apt-get download "$p" >/dev/null)
    dpkg-deb -x "$PKGS_DIR"/${p}_*.deb "$PKGS_DIR/$p.tmp" && mv "$PKGS_DIR/$p.tmp" "$PKGS_DIR/$p"
    rm -f "$PKGS_DIR"/${p}_*.deb
  fi
done
roots=()
for p in $PACKAGES; do roots+=(--noise-root "$PKGS_DIR/$p"); done
OMP_NUM_THREADS=1 "$PYCOSDIST" data synth "$OUT" --seed 0 --train-speakers 50 --test-speakers 4 --utts 36 \
  --test-utts 15 --real-speech --real-utts 40 \
  --extra-speech "$PKGS_DIR/hedgewars-data/usr/share/games/hedgewars/Data/Sounds/voices" --extra-utts 40 \
  "${roots[@]}" --recorded-fraction "${RECORDED_FRACTION:-0.6}" --noise-cache "$OUT.noise_cache"
