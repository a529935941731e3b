# Ends every process whose environment holds BENCHGATE_SESSION=$1, except this script and
# the process $2 (the session wrapper, when it starts this); with $3 = "list", only prints
# them, one "PID NAME" line each. Ending: SIGTERM every 0.1 s for two
# seconds, then SIGKILL for one more, until two looks in a row 0.1 s apart find none (a
# process handing off to a new child between two looks is caught by the second). One
# `grep -z` over /proc/*/environ where grep has it, else a `tr` and a `grep` per process.
# Runs as the session's user: root in a container lacks CAP_SYS_PTRACE and cannot read other
# users' environments. Needs only a POSIX sh and grep.
marker="BENCHGATE_SESSION=$1"; spared=${2:-}
grep -qz x /dev/null 2>/dev/null
if [ $? -eq 1 ]; then
  pids() {
    for file in $(grep -lzxF "$marker" /proc/[0-9]*/environ 2>/dev/null); do
      pid=${file#/proc/}; pid=${pid%/environ}
      [ "$pid" = "$$" ] || [ "$pid" = "$spared" ] || echo "$pid"
    done
  }
else
  pids() {
    for dir in /proc/[0-9]*; do
      pid=${dir#/proc/}
      [ "$pid" = "$$" ] || [ "$pid" = "$spared" ] && continue
      tr "\0" "\n" < "$dir/environ" 2>/dev/null | grep -qxF "$marker" && echo "$pid"
    done
  }
fi
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
