#!/usr/bin/env bash
# Makes what docker-compose.yaml needs, next to this file:
#   tls/ca.pem, tls/ca-key.pem           the cluster's CA (keep ca-key.pem to yourself)
#   tls/node-ID.pem, tls/node-ID-key.pem  one per node: 1, 2, 3 (mode-1..3) and 1001 (mode-agent-1)
#   tls/admin.pem, tls/admin-key.pem      a client certificate with the admin role, for modectl
#   .env                                  MODE_GID and the compose project's name
# Existing files are kept, so running it again after adding a node makes only what is missing.
#
# Uses modectl from PATH if there is one, else from the image (MODE_IMAGE, default mode:latest).
#
# Who reads what: every file belongs to you. The nodes run as uid 65532 with your group
# (MODE_GID in .env), and node keys are 0640, so they read their keys through the group; the
# CA's and admin's keys stay 0600, yours alone.
set -euo pipefail
cd "$(dirname "$0")"

image="${MODE_IMAGE:-mode:latest}"
# id=name: the compose service each node certificate is for.
nodes=(1=mode-1 2=mode-2 3=mode-3 1001=mode-agent-1)

mkdir -p tls
chmod 0750 tls
if command -v modectl >/dev/null 2>&1; then
  modectl=(modectl)
  dir=tls
else
  # The image's entrypoint is mode-node; as you, so that the files are yours.
  modectl=(docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/tls:/tls"
    --entrypoint /usr/local/bin/modectl "$image")
  dir=/tls
fi

if [ ! -e tls/ca.pem ]; then
  "${modectl[@]}" tls ca create --dir "$dir"
fi
for node in "${nodes[@]}"; do
  id="${node%%=*}"
  name="${node#*=}"
  if [ ! -e "tls/node-$id.pem" ]; then
    # Peers dial each other by service name; clients on this host by 127.0.0.1 and
    # localhost, which every node certificate names.
    "${modectl[@]}" tls cert create --node "$id" --dns "$name" --dir "$dir"
  fi
  chmod 0640 "tls/node-$id-key.pem"
done
if [ ! -e tls/admin.pem ]; then
  "${modectl[@]}" tls cert create --client admin --role admin --dir "$dir"
fi

cat > .env <<ENV
# Written by certs.sh: the group the nodes read their keys with (yours).
COMPOSE_PROJECT_NAME=mode
MODE_GID=$(id -g)
ENV
echo "certificates in $PWD/tls; next: docker-compose -f $PWD/docker-compose.yaml up -d"
