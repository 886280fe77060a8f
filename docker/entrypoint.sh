#!/bin/sh
# The image's entry point. It runs as root only long enough to start gradwire as the unprivileged
# `gradwire` user. When the container was given CAP_NET_ADMIN (compose's cap_add, needed to shape
# a worker's link with GRADWIRE_LINK / GRADWIRE_LINKS), that one capability is passed on as an
# ambient capability, so the worker can shape its own container's interface after it learns its
# rank; every other capability is dropped.
set -eu
# Compose mounts the user's data folder at /data and passes the host's path as
# GRADWIRE_HOST_DATA_DIR (empty: none given); only then is /data the PS's data folder.
if [ -n "${GRADWIRE_HOST_DATA_DIR:-}" ] && [ -z "${GRADWIRE_DATA_DIR:-}" ]; then
    export GRADWIRE_DATA_DIR=/data
fi
if [ "$(id -u)" != 0 ]; then
    exec gradwire "$@"
fi
export HOME=/home/gradwire

# Credentials bind-mounted from the host (docker-compose.tls.yml) keep the host's owner and mode,
# and a key is readable by its owner only, so the gradwire user could not read it. As root, copy
# each file a GRADWIRE_* variable names into a directory only gradwire can read (in this
# container's own filesystem: never in the image) and point the variable at the copy.
secrets=/run/gradwire-credentials
for var in GRADWIRE_TLS_CA GRADWIRE_TLS_CERT GRADWIRE_TLS_KEY GRADWIRE_TOKEN_FILE GRADWIRE_TOKEN_FROM; do
    eval "path=\${$var:-}"
    if [ -n "$path" ] && [ -f "$path" ]; then
        install -d -o gradwire -g gradwire -m 0700 "$secrets"
        install -o gradwire -g gradwire -m 0400 "$path" "$secrets/$var"
        export "$var=$secrets/$var"
    fi
done

bounding=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
if [ $(( (0x$bounding >> 12) & 1 )) = 1 ]; then  # bit 12 is CAP_NET_ADMIN
    exec setpriv --reuid=gradwire --regid=gradwire --init-groups \
        --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin --bounding-set=-all,+net_admin \
        -- gradwire "$@"
fi
exec setpriv --reuid=gradwire --regid=gradwire --init-groups --inh-caps=-all --bounding-set=-all -- gradwire "$@"
