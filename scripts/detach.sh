#!/usr/bin/env bash
# Start a long-lived daemon detached from the caller: detach.sh LOGFILE COMMAND [ARGS...]
#
# The daemon gets a new session, /dev/null as stdin, LOGFILE as stdout and stderr, and none of the
# caller's other open file descriptors. The last part matters: bootstrap.sh holds a flock on fd 9,
# and a dockerd that inherited it held the lock for its whole life, so the next bootstrap (the
# container test's) waited on it forever. Prints the daemon's pid.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 LOGFILE COMMAND [ARGS...]" >&2; exit 2; }
logfile=$1; shift
(
    # Close every inherited descriptor above stderr before exec (bash opens none of its own here
    # except the one the listing itself uses, which is gone by the time it is closed).
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid "$@" </dev/null >>"$logfile" 2>&1
) &
echo $!
