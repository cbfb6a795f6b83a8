# shellcheck shell=bash
# Sourced by run.sh and test.sh: create .venv when missing and install a requirements file
# whenever it changed since the last install.
ensure_venv() {
  local requirements=$1
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  local stamp
  stamp=".venv/.installed-$(basename "$requirements").sha256"
  local wanted
  wanted=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    python -m pip install --disable-pip-version-check --quiet --upgrade pip
    python -m pip install --disable-pip-version-check --quiet -r "$requirements"
    echo "$wanted" >"$stamp"
  fi
}
