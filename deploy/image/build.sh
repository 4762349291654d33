#!/usr/bin/env bash
# Build the container image `mode:<version>` (and `mode:latest`) from this checkout:
#   bash deploy/image/build.sh [TAG...]
# Static binaries (glibc, +crt-static) for the host's architecture, in an image FROM scratch:
# nothing is pulled. Prints the image's name and size.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"
triple="$(rustc -vV | sed -n 's/^host: //p')"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
# A target directory of its own: the static flags would otherwise rebuild the ordinary one.
target_dir="${MODE_IMAGE_TARGET_DIR:-$root/target/image}"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
  cargo build --profile image --locked --target "$triple" -p mode-node -p modectl --bins
bin="$target_dir/$triple/image"
for b in mode-node modectl; do
  case "$(ldd "$bin/$b" 2>&1 || true)" in
    *"statically linked"* | *"not a dynamic executable"*) ;;
    *) echo "error: $bin/$b is dynamically linked; the image has no libc" >&2; exit 1 ;;
  esac
done

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$bin/mode-node" "$bin/modectl" deploy/image/Dockerfile "$context/"
mkdir -p "$context/root/etc" "$context/root/tmp" "$context/data/mode"
chmod 1777 "$context/root/tmp"
chmod 0775 "$context/data/mode"
printf 'root:x:0:0:root:/:/sbin/nologin\nmode:x:65532:65532:mode:/var/lib/mode:/sbin/nologin\n' >"$context/root/etc/passwd"
printf 'root:x:0:\nmode:x:65532:\n' >"$context/root/etc/group"
chmod 0644 "$context/root/etc/passwd" "$context/root/etc/group"
revision="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
# The commit's time, not the build's, so that the same commit labels its image the same
# (SOURCE_DATE_EPOCH, the reproducible-builds convention, overrides it).
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
tags=("mode:$version" "mode:latest" "$@")
args=()
for t in "${tags[@]}"; do args+=(-t "$t"); done
docker build -q "${args[@]}" \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$revision" \
  --build-arg CREATED="$created" \
  --build-arg SOURCE="$(sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml | head -n1)" \
  "$context" >/dev/null
size="$(docker image inspect "mode:$version" --format '{{.Size}}')"
echo "built ${tags[*]}: $((size / 1024 / 1024)) MiB ($size bytes)"
