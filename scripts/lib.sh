# Shared by the launcher scripts: start a server in the background on 127.0.0.1,
# wait for its port, remember its pid; stop servers by pid.

# port_open PORT: whether something listens on 127.0.0.1:PORT.
port_open() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start_server NAME PORT COMMAND...: prints nothing; fails when the port is taken by
# another process (its tests would talk to someone else's server), or when the
# server exits or its port never opens.
start_server() {
  local name=$1 port=$2; shift 2
  local pidfile="$RUN/$name-$port.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then kill "$(cat "$pidfile")"; sleep 0.5; fi
  rm -f "$pidfile"
  for _ in $(seq 1 20); do port_open "$port" || break; sleep 0.1; done
  if port_open "$port"; then
    echo "$name: port $port on 127.0.0.1 is in use by another process; stop it or pick another port" >&2
    return 1
  fi
  "$@" >"$RUN/$name-$port.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$pidfile"
  for _ in $(seq 1 100); do
    if port_open "$port"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "$name did not start; see $RUN/$name-$port.log" >&2
  return 1
}

# stop_servers NAME [PORT]: stops the server of that name started by start_server on
# PORT, or every one of that name.
stop_servers() {
  local f
  for f in "$RUN/$1"-${2:-*}.pid; do
    [ -f "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}
