# Shared by the launcher scripts: start a server in the background on 127.0.0.1,
# wait for its port, remember its pid; stop servers by pid.

# start_server NAME PORT COMMAND...: prints nothing, fails when the port never opens.
start_server() {
  local name=$1 port=$2; shift 2
  local pidfile="$RUN/$name-$port.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then kill "$(cat "$pidfile")"; sleep 0.5; fi
  "$@" >"$RUN/$name-$port.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 100); do
    if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$name did not start; see $RUN/$name-$port.log" >&2
  return 1
}

# stop_servers NAME: stops every server of that name started by start_server.
stop_servers() {
  local f
  for f in "$RUN/$1"-*.pid; do
    [ -f "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}
