# Ends every process whose environment holds BENCHGATE_SESSION=$1, except this script and
# the process $2 (the session wrapper, when it starts this); with $3 = "list", only prints
# them, one "PID NAME" line each. Run as benchgate's teardown (no $2), it also ends what
# shares a session with a process it found (a job that cleared its environment: `env -i`,
# `unset`). Ending: SIGTERM every 0.1 s for two
# seconds, then SIGKILL for one more, until two looks in a row 0.1 s apart find none (a
# process handing off to a new child between two looks is caught by the second). One
# `grep -z` over /proc/*/environ where grep has it, else a `tr` and a `grep` per process.
# Runs as the session's user: root in a container lacks CAP_SYS_PTRACE and cannot read other
# users' environments. Needs only a POSIX sh and grep.
marker="BENCHGATE_SESSION=$1"; spared=${2:-}
grep -qz x /dev/null 2>/dev/null
if [ $? -eq 1 ]; then
  marked() {
    for file in $(grep -lzxF "$marker" /proc/[0-9]*/environ 2>/dev/null); do
      pid=${file#/proc/}; pid=${pid%/environ}
      [ "$pid" = "$$" ] || [ "$pid" = "$spared" ] || echo "$pid"
    done
  }
else
  marked() {
    for dir in /proc/[0-9]*; do
      pid=${dir#/proc/}
      [ "$pid" = "$$" ] || [ "$pid" = "$spared" ] && continue
      tr "\0" "\n" < "$dir/environ" 2>/dev/null | grep -qxF "$marker" && echo "$pid"
    done
  }
fi
# The state and session ID of process $1, in $state and $sid (builtins only).
session_of() {
  line=; { read -r line < "/proc/$1/stat"; } 2>/dev/null
  set -f; set -- ${line##*") "}; set +f
  state=${1:-}; sid=${4:-}
}
# Sessions of processes found so far (teardown only): what else is in them goes too.
sessions=
pids() {
  marked
  [ -n "$sessions" ] || return 0
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [ "$pid" = "$$" ] || [ "$pid" = 1 ] && continue
    session_of "$pid"
    # A zombie is over already (an init that never reaps keeps it).
    [ "$state" = Z ] && continue
    case " $sessions " in *" $sid "*) echo "$pid" ;; esac
  done
}
if [ "${3:-}" = list ]; then
  for pid in $(pids); do
    name=; { read -r name < "/proc/$pid/comm"; } 2>/dev/null
    echo "$pid ${name:-?}"
  done
  exit 0
fi
round=0; empty_looks=0
while [ $round -lt 30 ]; do
  found=$(pids)
  if [ -z "$spared" ]; then
    for pid in $found; do
      session_of "$pid"
      case " $sessions " in *" $sid "*) ;; *) [ -z "$sid" ] || sessions="$sessions $sid" ;; esac
    done
  fi
  if [ -z "$found" ]; then
    empty_looks=$((empty_looks+1)); [ $empty_looks -ge 2 ] && exit 0
  elif [ $round -lt 20 ]; then
    empty_looks=0; kill -TERM $found 2>/dev/null
  else
    empty_looks=0; kill -KILL $found 2>/dev/null
  fi
  sleep 0.1 2>/dev/null || sleep 1
  round=$((round+1))
done
# Still there after a second of SIGKILL (another user's, or stuck in the kernel): say so.
exit 1
