#!/usr/bin/env bash
# Install Triton's perf_analyzer into .tools/ (gitignored), idempotently.
#
# On Debian 12 (glibc 2.36) the perf_analyzer wheels on PyPI need glibc 2.38; the binary
# inside the tritonclient 2.47.0 wheel runs, given Debian's libb64 and libcudart.so.12
# (from PyPI's nvidia-cuda-runtime-cu12) in a private folder.
#
#   scripts/get-perf-analyzer.sh        -> .tools/bin/perf_analyzer (a wrapper script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TOOLS=.tools/perf_analyzer
WRAPPER=.tools/bin/perf_analyzer

# The tritonclient wheel puts its own perf_analyzer (and perf_client) into the venv's bin,
# which does not run here (libb64 missing): point them at the wrapper, so that an
# activated venv's `perf_analyzer` is the one that works.
venv_copies() {
    local bin
    bin=$(dirname "$PY")
    for name in perf_analyzer perf_client; do
        if [[ -e $bin/$name ]] && ! "$bin/$name" --version >/dev/null 2>&1; then
            rm -f "$bin/$name"
            printf '#!/usr/bin/env bash\nexec "%s" "$@"\n' "$PWD/$WRAPPER" > "$bin/$name"
            chmod +x "$bin/$name"
        fi
    done
}

if [[ -x $WRAPPER ]] && "$WRAPPER" --version >/dev/null 2>&1; then
    venv_copies
    exit 0
fi
rm -rf "$TOOLS" && mkdir -p "$TOOLS/lib" "$TOOLS/bin" .tools/bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "perf_analyzer: downloading tritonclient 2.47.0 and nvidia-cuda-runtime-cu12 wheels" >&2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" \
    tritonclient==2.47.0 "nvidia-cuda-runtime-cu12>=12,<13"
"$PY" - "$tmp" "$TOOLS" <<'PYEOF'
import sys, zipfile, pathlib, shutil
tmp, tools = map(pathlib.Path, sys.argv[1:])
for wheel in tmp.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.endswith("data/bin/perf_analyzer") or base.startswith("libcudart.so.12"):
                dest = tools / ("bin" if base == "perf_analyzer" else "lib") / base
                with z.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
PYEOF
chmod +x "$TOOLS/bin/perf_analyzer"

echo "perf_analyzer: fetching Debian's libb64-0d" >&2
# A fresh machine may have no package lists yet: update them once if the download fails.
(cd "$tmp" && { apt-get download libb64-0d >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get download libb64-0d >/dev/null; }; }) || {
    echo "perf_analyzer: apt-get could not download libb64-0d (its error above). Where the" \
        "package lists are empty, run \`sudo apt-get update\` first." >&2
    exit 1
}
dpkg -x "$tmp"/libb64-0d_*.deb "$tmp/b64"
cp -a "$tmp"/b64/usr/lib/*/libb64.so* "$TOOLS/lib/"

cat > "$WRAPPER" <<'WRAP'
#!/usr/bin/env bash
here="$(cd "$(dirname "$0")/../perf_analyzer" && pwd)"
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/perf_analyzer" "$@"
WRAP
chmod +x "$WRAPPER"
"$WRAPPER" --version >/dev/null 2>&1 || { echo "perf_analyzer installed but does not run; try: LD_DEBUG=libs $WRAPPER --version" >&2; exit 1; }
venv_copies
echo "perf_analyzer: ready at $WRAPPER" >&2
