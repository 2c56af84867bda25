# Shared by the benchmark scripts that run omni-sim and nginx (source it after `cd` to the
# source tree, with SIM set): a run folder removed on exit, sims started in it and stopped on
# exit, free ports, and the http{} lines nginx needs to run from that folder.

dir="$(mktemp -d)"
chmod 755 "$dir"
mkdir -p "$dir/logs" "$dir/tmp" && chmod 777 "$dir/tmp"
bench_cleanup() {
  [ -f "$dir/nginx.pid" ] && /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -s quit 2>/dev/null || true
  # sim() runs in a command substitution (a subshell): its pids are in files.
  for f in "$dir"/*.pid; do [ "$f" = "$dir/nginx.pid" ] || kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap bench_cleanup EXIT

# sim NAME ARGS...: starts omni-sim 100x faster than real time and prints its first HTTP port.
sim() {
  local name="$1"; shift
  "$SIM" --port 0 --time-scale 0.01 --duration 900 --ready-file "$dir/$name.json" "$@" \
    > "$dir/$name.log" 2>&1 &
  echo "$!" > "$dir/$name.pid"
  for _ in $(seq 1 400); do [ -f "$dir/$name.json" ] && break; sleep 0.05; done
  /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['instances'][0]['http_port'])" \
    "$dir/$name.json"
}

free_port() {
  /usr/bin/python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"
}

# Lines for http{}: no access log, temporary files in the run folder.
http_preamble() {
  cat <<CONF
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
CONF
}
