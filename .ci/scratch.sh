# Sourced by the CI scripts. scratch_dir makes a new, empty folder under the
# checkout's build/ (ignored by git) and prints its path; the caller removes
# it. Inside the checkout, a copied tree's paths relative to the checkout are
# the same in every run, and those relative paths are what the compile cache
# (.ci/compile_cache.sh) hashes: a folder in /tmp would miss it every time.
scratch_dir() {
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build
  mkdir -p "$root"
  mktemp -d -p "$root" ci.XXXXXX
}
