# shellcheck shell=bash
# Shared by the benchmark scripts that run omni-sim and nginx (source it after `cd` to the
# source tree, with SIM set if sim() is used): a run folder removed on exit, sims and nginx
# instances started in it and stopped on exit, free ports, and the http{} lines nginx needs to
# run from that folder.

dir="$(mktemp -d)"
chmod 755 "$dir"
mkdir -p "$dir/logs" "$dir/tmp" && chmod 777 "$dir/tmp"
bench_cleanup() {
  [ -f "$dir/nginx.pid" ] && /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -s quit 2>/dev/null || true
  # sim() runs in a command substitution (a subshell): its pids are in files. nginx_start's
  # masters (NAME.nginx.pid) get a graceful quit.
  local f masters=()
  for f in "$dir"/*.pid; do
    [ -f "$f" ] || continue
    case "$f" in
      "$dir/nginx.pid") ;;
      *.nginx.pid) masters+=("$(cat "$f")"); kill -QUIT "${masters[-1]}" 2>/dev/null || true ;;
      *) kill "$(cat "$f")" 2>/dev/null || true ;;
    esac
  done
  wait 2>/dev/null || true
  local pid
  for pid in "${masters[@]}"; do  # not children of this shell: wait for them by polling
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  done
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

# nginx_start NAME: runs Debian's nginx on $dir/NAME.conf, whose `pid` line must be
# `pid $dir/NAME.nginx.pid;`, and waits for its pid file. For scripts that run several nginx
# instances at once (the single $dir/nginx.conf above is for one); bench_cleanup stops them.
nginx_start() {
  /usr/sbin/nginx -p "$dir" -c "$dir/$1.conf"
  for _ in $(seq 1 200); do [ -s "$dir/$1.nginx.pid" ] && return 0; sleep 0.05; done
  echo "nginx $1 did not start: $(tail -3 "$dir/logs/$1.error.log" 2>/dev/null)" >&2
  return 1
}
