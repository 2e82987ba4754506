#!/usr/bin/env bash
# Installs the real programs the integration tests start, each in its own venv OUTSIDE the checkout, cached
# between runs (a venv is rebuilt only when its pinned version changes):
#   labelstudio  label-studio (its own venv: it pins Django 5.2, pytz<2023 and ~60 more)   ~1.5 min
#   llamacpp     llama-cpp-python[server], built from source                               ~12 min on 2 cores
#   chromium     Debian's chromium, for the screenshot of the labeling page (apt-get, as root)
# Usage: tests/integrations/setup.sh [labelstudio] [llamacpp] [chromium]     (no argument: all three)
# A program that cannot be installed leaves one line in $CACHE/<name>.failed; its tests skip with that line.
set -uo pipefail

CACHE=${ALIGN_INTEGRATIONS_CACHE:-$HOME/.cache/align/integrations}
PY=${PY:-python3}
LABEL_STUDIO=${LABEL_STUDIO:-label-studio==1.23.2}
LLAMA_CPP=${LLAMA_CPP:-llama-cpp-python[server]==0.3.36}
mkdir -p "$CACHE"

# venv NAME SPEC: $CACHE/NAME-venv with SPEC installed, unless its stamp says it already is
venv() {
  local name=$1 spec=$2 dir=$CACHE/$1-venv log=$CACHE/$1.log
  if [[ -f $dir/.installed && $(cat "$dir/.installed") == "$spec" ]]; then
    echo "$name: $spec (cached in $dir)"; return 0
  fi
  rm -rf "$dir" "$CACHE/$name.failed"
  echo "$name: installing $spec into $dir (log: $log)"
  local start=$SECONDS
  if "$PY" -m venv "$dir" >"$log" 2>&1 && "$dir/bin/pip" install -q --upgrade pip >>"$log" 2>&1 \
      && "$dir/bin/pip" install "$spec" >>"$log" 2>&1; then
    echo "$spec" >"$dir/.installed"
    echo "$name: installed in $((SECONDS - start)) s"
  else
    echo "$name: '$spec' did not install ($(grep -m1 -iE 'error' "$log" | cut -c1-160); see $log)" \
      | tee "$CACHE/$name.failed"
  fi
}

install_chromium() {
  rm -f "$CACHE/chromium.failed"
  if command -v chromium >/dev/null; then echo "chromium: $(chromium --version 2>/dev/null)"; return 0; fi
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "chromium: apt-get install chromium"
    (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) \
      >"$CACHE/chromium.log" 2>&1
  fi
  command -v chromium >/dev/null && echo "chromium: $(chromium --version 2>/dev/null)" \
    || echo "chromium: not installed (as root: apt-get install chromium)" | tee "$CACHE/chromium.failed"
}

for what in "${@:-labelstudio llamacpp chromium}"; do
  for w in $what; do
    case $w in
      labelstudio) venv labelstudio "$LABEL_STUDIO" ;;
      llamacpp) venv llamacpp "$LLAMA_CPP" ;;
      chromium) install_chromium ;;
      *) echo "unknown: $w (labelstudio | llamacpp | chromium)"; exit 2 ;;
    esac
  done
done
