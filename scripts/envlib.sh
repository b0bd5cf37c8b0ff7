# Functions scripts/setup.sh uses (sourced; tests/launchers/test_reliability.py calls them on the current environment).
#
# One dependency environment per dependency spec is shared by every checkout (~6 GB, built once); each checkout gets
# its own small `.venv` layered on it, so `.venv/bin/python`, `guard-fast`, `torchrun` and `deepspeed` import that
# checkout's code, never the one that last ran `make setup`.

# layer_venv DEP_VENV CHECKOUT: (re)create CHECKOUT/.venv: a venv without packages whose .pth puts CHECKOUT first on
# sys.path and then adds DEP_VENV's site-packages (site.addsitedir); its bin/ holds the dependency scripts (torchrun,
# deepspeed, pytest, pip, ...) with their shebang pointing at this .venv's python, and `guard-fast`.
layer_venv() {
  local dep=$1 repo=$2 v=$2/.venv pyver site want pth f name
  pyver=$("$dep/bin/python" -c 'import sys; print("python%d.%d" % sys.version_info[:2])') || return 1
  site=$dep/lib/$pyver/site-packages
  want=$(printf '%s\nimport site; site.addsitedir(%s)' "$repo" "'$site'")
  pth=$v/lib/$pyver/site-packages/guard_fast_checkout.pth
  if [ -L "$v" ] || { [ -e "$v" ] && [ "$(cat "$pth" 2>/dev/null)" != "$want" ]; }; then
    rm -rf "$v"  # an old link into the shared environment, or a layer over another environment or checkout
  fi
  if [ ! -e "$pth" ]; then
    "$dep/bin/python" -m venv --without-pip "$v" || return 1
    printf '%s\n' "$want" > "$pth"
  fi
  for f in "$dep"/bin/*; do
    name=${f##*/}
    case $name in python*|activate*|Activate.ps1|guard-fast) continue ;; esac
    if head -n 1 "$f" 2>/dev/null | grep -aq '^#!/.*/bin/python[0-9.]*$'; then  # a Python script of DEP_VENV
      { printf '#!%s/bin/python\n' "$v"; tail -n +2 "$f"; } > "$v/bin/$name.tmp" && chmod +x "$v/bin/$name.tmp" \
        && mv "$v/bin/$name.tmp" "$v/bin/$name"
    else
      ln -sfn "$f" "$v/bin/$name"
    fi
  done
  printf '#!%s/bin/python\nimport sys\n\nfrom launchers.cli import main\n\nsys.exit(main())\n' "$v" > "$v/bin/guard-fast"
  chmod +x "$v/bin/guard-fast"
}

# register_user CACHE CHECKOUT: remember that CHECKOUT uses environments from CACHE (read by remove_unused).
register_user() {
  mkdir -p "$1/users"
  printf '%s\n' "$2" > "$1/users/$(printf '%s' "$2" | sha256sum | cut -c1-16)"
}

# in_use CACHE ENV: true if a registered checkout's .venv layers on (or links to) ENV, or a running process has a
# file of ENV mapped or open.
in_use() {
  local cache=$1 env=$2 u repo
  for u in "$cache"/users/*; do
    [ -f "$u" ] || continue
    repo=$(cat "$u")
    [ -d "$repo" ] || { rm -f "$u"; continue; }  # the checkout is gone
    if grep -qsF "$env/" "$repo"/.venv/lib/python*/site-packages/guard_fast_checkout.pth \
      || [ "$(readlink "$repo/.venv" 2>/dev/null)" = "$env" ]; then
      return 0
    fi
  done
  grep -qsF "$env/" /proc/[0-9]*/maps 2>/dev/null && return 0
  ls -l /proc/[0-9]*/fd 2>/dev/null | grep -qF "$env/" && return 0
  return 1
}

# remove_unused CACHE KEEP: delete environments other than KEEP that nothing uses (callers hold the build lock).
remove_unused() {
  local cache=$1 keep=$2 env
  for env in "$cache"/venv-*; do
    [ -d "$env" ] && [ "$env" != "$keep" ] || continue
    if in_use "$cache" "$env"; then
      printf '[setup] keeping %s: still in use\n' "$env"
    else
      printf '[setup] removing unused environment %s\n' "$env"
      rm -rf "$env"
    fi
  done
}
