#!/usr/bin/env bash
# The bare command sequence that juicefs-fsm replaces, for the benchmark (bench/run.py).
# Same commands, same flags: they come from BASE/bare.vars, which bench/emit_config.py writes
# from the controller's own adapters (mount_argv(), config_text(), ...). Run it first.
#
#   start       mkdir; juicefs format (if there is no metadata.db); litestream replicate &;
#               juicefs mount &; wait until the mount answers; mkdir active/fs and checkpoints
#   checkpoint  juicefs clone --preserve active checkpoints/ID; litestream sync -wait
#   restore     mv active checkpoints/pre-restore-ID-<unix>; juicefs clone --preserve
#               checkpoints/ID active; litestream sync -wait
#   stop        juicefs umount --flush; wait for the mount process; litestream sync -wait;
#               SIGTERM litestream; wait
#
# One shot:  bench/bare.sh start BASE      (children keep running; `stop BASE` ends them)
# Server:    bench/bare.sh serve           reads "OP BASE [ARG]" lines on stdin, answers
#            "ok MICROSECONDS" (time measured inside bash, around the operation) or "err TEXT".
set -u
export LC_ALL=C   # EPOCHREALTIME with a '.' decimal point

declare -A MOUNT_PID LS_PID
exec {TICK}<> <(:)   # a pipe nobody writes: `read -t` on it is a sleep without a fork

nap() { read -r -t "$1" -u "$TICK" _ || true; }

vars() { # shellcheck source=/dev/null
    source "$1/bare.vars"; }

pid_of() { # pid kept in this shell (server mode) or in BASE/NAME.pid (one-shot mode)
    local base=$1 name=$2 kept
    if [ "$name" = mount ]; then kept=${MOUNT_PID[$base]:-}; else kept=${LS_PID[$base]:-}; fi
    if [ -n "$kept" ]; then echo "$kept"; else cat "$base/$name.pid"; fi
}

wait_gone() { # reap our child; a process of an earlier one-shot run is polled
    wait "$1" 2>/dev/null
    while kill -0 "$1" 2>/dev/null; do nap 0.005; done
}

start() {
    local base=$1
    vars "$base"
    [ -d "$MP" ] || mkdir -p "${MKDIRS[@]}"
    if [ ! -e "$DB" ]; then "${FORMAT[@]}" >>"$base/bare-format.log" 2>&1 || return 1; fi
    rm -f "$SOCK"
    "${REPLICATE[@]}" </dev/null >>"$base/bare-litestream.log" 2>&1 &
    LS_PID[$base]=$!
    "${MOUNT[@]}" </dev/null >>"$base/bare-mount.log" 2>&1 &
    MOUNT_PID[$base]=$!
    echo "${LS_PID[$base]}" >"$base/litestream.pid"
    echo "${MOUNT_PID[$base]}" >"$base/mount.pid"
    # Usable = the FUSE mount answers: .config is JuiceFS's own virtual file at the root.
    until [ -e "$MP/.config" ]; do
        kill -0 "${MOUNT_PID[$base]}" 2>/dev/null || { echo "mount exited" >&2; return 1; }
        nap 0.005
    done
    [ -d "$MP/active/fs" ] || mkdir -p "$MP/active/fs" "$MP/checkpoints"
}

checkpoint() {
    local base=$1 id=$2
    vars "$base"
    "${CLONE[@]}" "$MP/active" "$MP/checkpoints/$id" >/dev/null || return 1
    "${SYNC[@]}" >/dev/null
}

restore() {
    local base=$1 id=$2
    vars "$base"
    mv "$MP/active" "$MP/checkpoints/pre-restore-$id-$EPOCHSECONDS" || return 1
    "${CLONE[@]}" "$MP/checkpoints/$id" "$MP/active" >/dev/null || return 1
    "${SYNC[@]}" >/dev/null
}

stop() {
    local base=$1 mount ls
    vars "$base"
    mount=$(pid_of "$base" mount) ls=$(pid_of "$base" litestream)
    # Anything reading the mount at that instant makes umount fail with "target is busy"
    # (e.g. another program's scan of every juicefs mount's .config): retry a few times.
    local try
    for try in 1 2 3 4 5 6 7 8 9 10; do
        "${UMOUNT[@]}" >>"$base/bare-umount.log" 2>&1 && break
        [ "$try" = 10 ] && return 1
        echo "umount attempt $try failed; retrying" >&2
        nap 0.05
    done
    wait_gone "$mount"
    # The controller's stop does this barrier too: litestream's own final sync on SIGTERM was
    # seen to upload nothing when it had run for less than a second.
    "${SYNC[@]}" >/dev/null
    kill -TERM "$ls" 2>/dev/null
    wait_gone "$ls"
    unset "MOUNT_PID[$base]" "LS_PID[$base]"
}

leftovers() { # server mode, on exit: nothing of ours stays mounted or running
    local base
    for base in "${!MOUNT_PID[@]}"; do
        umount -l "$base/data" 2>/dev/null
        kill -TERM "${MOUNT_PID[$base]}" "${LS_PID[$base]}" 2>/dev/null
    done
}

serve() {
    local op base arg t0 t1
    trap leftovers EXIT
    while read -r op base arg; do
        case $op in
            start|stop|checkpoint|restore) ;;
            quit) return 0 ;;
            *) echo "err unknown operation $op"; continue ;;
        esac
        t0=$EPOCHREALTIME
        if "$op" "$base" $arg 2>>"$base/bare-errors.log"; then
            t1=$EPOCHREALTIME
            echo "ok $(( ${t1/./} - ${t0/./} ))"
        else
            echo "err $op $base failed; see $base/bare-*.log"
        fi
    done
}

case ${1:-} in
    serve) serve ;;
    start|stop|checkpoint|restore) op=$1; shift; "$op" "$@" ;;
    *) echo "usage: $0 serve | start BASE | stop BASE | checkpoint BASE ID | restore BASE ID" >&2
       exit 2 ;;
esac
