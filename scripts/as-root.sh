# Sourced by the scripts that need root: run the calling script as root, directly
# on a root shell (where sudo may not even exist), else through sudo.
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -E -- "$0" "$@"; fi
  echo "$(basename "$0"): needs root and there is no sudo here: run it from a root shell" >&2
  exit 1
fi
