# The session wrapper: runs the command, then ends what it left behind. Arguments: the end
# script (end.sh), the terminal size to wait for ("rows cols", or empty), what to do with
# leftovers ("end" or "hangup"), then the command's argv. See docker::exec::cleaning_up_after.
#
# Only variables prefixed __benchgate_ are set before the command runs, and none is exported,
# so the command's environment is what Docker gave it.
__benchgate_end_script=$1; __benchgate_size=$2; __benchgate_leftovers=$3; shift 3
# Engines without console_size set the terminal's size only after the process started: hold
# the command until the terminal has its size (at most about a second), so that its first
# look at the size is right.
if [ -n "$__benchgate_size" ] && command -v stty >/dev/null 2>&1; then
  __benchgate_tries=0
  while [ "$(stty size 2>/dev/null)" != "$__benchgate_size" ] && [ $__benchgate_tries -lt 100 ]; do
    sleep 0.01 2>/dev/null || break
    __benchgate_tries=$((__benchgate_tries+1))
  done
fi
# Terminal signals are caught, not ignored, so the command still gets them as usual and the
# cleanup below still runs.
trap : INT QUIT
# Init's children, every thread's, as one list of PIDs.
__benchgate_init_children() {
  __benchgate_children=
  for __benchgate_file in /proc/1/task/[0-9]*/children; do
    __benchgate_line=
    { read -r __benchgate_line < "$__benchgate_file"; } 2>/dev/null
    __benchgate_children="$__benchgate_children $__benchgate_line"
  done
}
__benchgate_init_children; __benchgate_before="$__benchgate_children"
# The command gets the wrapper's stderr; the wrapper itself prints nothing ("Killed"...).
exec 3>&2 2>/dev/null
(exec "$@" 2>&3 3>&-)
status=$?
exec 2>&3 3>&-
# The terminal hangs up when the wrapper, its session leader, exits; the end script must live.
trap "" HUP
marker=$BENCHGATE_SESSION
unset BENCHGATE_SESSION

# `stat` fields after "(comm) ": $1 state, $2 parent PID, $4 session ID, $20 start time.
stat_fields() {
  line=; { read -r line < "$1"; } 2>/dev/null
  set -f; set -- ${line##*") "}; set +f
  state=$1; parent=$2; session=$4; start=${20:-}
}
stat_fields /proc/self/stat
# Orphans start after the wrapper; an empty $started means "cannot tell: scan".
started=$start; own_session=$session
# The wrapper's parent is outside the container (PID 0) unless it shares the host's PIDs.
[ "$parent" = 0 ] && [ -r /proc/1/task/1/children ] && [ -n "$own_session" ] || started=
stat_fields /proc/1/stat
init_session=$session
[ -n "$init_session" ] || started=

# Init's new children that seem to belong to this session, and those of them in the wrapper's
# own session (plain background jobs: certainly this session's).
leftovers=; own=
add_name() { case ", $names, " in *", $1, "*) ;; *) names="${names:+$names, }$1" ;; esac; }
looks=0; again=; zombies=
while [ -n "$started" ] && [ $looks -lt 3 ]; do
  looks=$((looks+1)); again=; leftovers=; own=
  __benchgate_init_children
  # Under an init that never reaps, children only ever grow at the end of the list.
  case "$__benchgate_children" in
    "$__benchgate_before"*) __benchgate_children=${__benchgate_children#"$__benchgate_before"} ;;
  esac
  for pid in $__benchgate_children; do
    case "$__benchgate_before $zombies " in *" $pid "*) continue ;; esac
    stat_fields "/proc/$pid/stat"
    # Vanished during the look: it may have handed off to a child of its own.
    [ -n "$line" ] || { again=1; continue; }
    [ -n "$start" ] || { started=; break; }
    # Older than the wrapper: not this session's.
    [ "$start" -lt "$started" ] 2>/dev/null && continue
    [ "$state" = Z ] && { zombies="$zombies $pid "; again=1; continue; }
    # In init's session: not this session's.
    [ "$session" = "$init_session" ] && continue
    [ "$session" = "$own_session" ] && own="$own $pid"
    if [ "$session" != "$own_session" ] && [ "$session" != "$pid" ]; then
      # In the session of another exec's live main process (its parent is outside).
      leader=$session
      stat_fields "/proc/$leader/stat"
      [ "$parent" = 0 ] && continue
    fi
    # A leftover of this session, most likely (a process init started itself in a session of
    # its own looks the same: the marker decides below).
    leftovers="$leftovers $pid"
  done
  # Something moved during the look: look again, unless leftovers are found already.
  [ -n "$again" ] && [ -z "$leftovers" ] || break
done
[ -n "$again" ] && [ -z "$leftovers" ] && started=
trace() { [ -z "${BENCHGATE_TRACE:-}" ] || echo "benchgate-trace: $*" >&2; }
if [ -n "$started" ] && [ -z "$leftovers" ]; then
  trace fast
  exit $status
fi

# From here on processes are started, and in a container out of PIDs a failed fork ends this
# shell with status 2 (no trap runs). So the plain background jobs are named and sent SIGTERM
# with builtins first: that frees their PIDs.
names=; count=0
# A hangup goes to every process of the session, found by marker below.
[ "$__benchgate_leftovers" = hangup ] && own=
if [ -n "$own" ]; then
  for pid in $own; do
    name=; { read -r name < "/proc/$pid/comm"; } 2>/dev/null
    count=$((count+1)); add_name "${name:-?}"
  done
  kill -TERM $own 2>/dev/null
fi
# Everything else that carries this session's marker.
found=$(sh -c "$__benchgate_end_script" benchgate-end "$marker" $$ list </dev/null 2>/dev/null)
pids=
while read -r pid name; do
  case " $own " in *" $pid "*) continue ;; esac
  [ -n "$pid" ] || continue
  pids="$pids $pid"; count=$((count+1)); add_name "$name"
done <<LIST
$found
LIST
noun=processes; [ $count = 1 ] && noun=process
if [ "$__benchgate_leftovers" = hangup ]; then
  trace "hangup $count"
  [ $count -gt 0 ] || exit $status
  printf 'benchgate: sent a hangup to %s background %s left by this session (%s)\n' "$count" "$noun" "$names" >&2
  kill -HUP $pids 2>/dev/null
  exit $status
fi
trace "end $count"
[ $count -gt 0 ] && printf 'benchgate: ended %s background %s left by this session (%s)\n' "$count" "$noun" "$names" >&2
# The rest (what ignores TERM, children, hand-offs) is ended by marker in the background, so
# that the session ends now.
sh -c "$__benchgate_end_script" benchgate-end "$marker" $$ </dev/null >/dev/null 2>&1 &
exit $status
