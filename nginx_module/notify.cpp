// Wake-ups between nginx workers, without polling.
//
// nginx's channels run from the master to the workers only. Every worker (with omni_proxy_zone)
// binds an abstract unix datagram socket named after its pid ("\0omni-proxy/w/<pid>") and
// registers it in its event loop; another worker wakes it by sending one byte there. The names
// need no descriptor made before fork, so workers of an old and a new cycle (a reload) reach
// each other, and a respawned worker is reachable at once. Datagrams coalesce: a wake-up drains
// them all and runs the subscribers once. A wake-up of the worker itself posts an event instead.
// Delivery is best effort (a full receive queue already holds wake-ups; a gone worker needs
// none): every user also re-checks on a slow timer.
#include "omni_module.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <vector>

namespace omni::ngx {
namespace {

struct NotifyRuntime {
  ngx_connection_t* sock = nullptr;
  ngx_event_t local{};  // posted: a wake-up of this worker by itself
  std::vector<NotifyHandler> handlers;
  NotifyStats stats;
};

NotifyRuntime& nrt() {
  static NotifyRuntime r;
  return r;
}

sockaddr_un address_of(std::int32_t pid, socklen_t& len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  const int n = std::snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "omni-proxy/w/%d", pid);
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + static_cast<std::size_t>(n));
  return a;
}

void run_handlers() {
  // A handler may subscribe or finalize requests; iterate over a copy.
  const std::vector<NotifyHandler> handlers = nrt().handlers;
  for (NotifyHandler h : handlers) h();
}

void on_local(ngx_event_t*) noexcept {
  run_handlers();
}

void on_socket(ngx_event_t* ev) noexcept {
  NotifyRuntime& r = nrt();
  auto* c = static_cast<ngx_connection_t*>(ev->data);
  char buf[64];
  bool drained = false;
  for (int i = 0; i < 4096; ++i) {
    if (::recv(c->fd, buf, sizeof buf, MSG_DONTWAIT) < 0) {
      drained = true;
      break;
    }
    ++r.stats.received;
  }
  // Edge-triggered: what is left would never wake this worker again.
  if (!drained && !ev->posted) {
    ngx_post_event(ev, &ngx_posted_events);  // a multi-statement macro
  }
  run_handlers();
}

}  // namespace

bool notify_init(ngx_cycle_t* cycle) noexcept {
  NotifyRuntime& r = nrt();
  if (r.sock != nullptr) return true;
  r.local.handler = on_local;
  r.local.log = cycle->log;
  r.local.data = &r;
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno, "omni_proxy: wake-up socket() failed");
    return false;
  }
  socklen_t len = 0;
  const sockaddr_un a = address_of(ngx_pid, len);
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&a), len) != 0) {
    ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                  "omni_proxy: bind() of the wake-up socket failed");
    ::close(fd);
    return false;
  }
  ngx_connection_t* c = ngx_get_connection(fd, cycle->log);
  if (c == nullptr) {
    ::close(fd);
    return false;
  }
  c->read->handler = on_socket;
  c->read->log = cycle->log;
  c->write->log = cycle->log;
  c->data = c;
  if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
    ngx_close_connection(c);
    return false;
  }
  r.sock = c;
  return true;
}

void notify_exit() noexcept {
  NotifyRuntime& r = nrt();
  if (r.local.posted) {
    ngx_delete_posted_event(&r.local);  // a multi-statement macro
  }
  if (r.sock != nullptr) {
    ngx_close_connection(r.sock);
    r.sock = nullptr;
  }
  r.handlers.clear();
}

bool notify_ready() noexcept {
  return nrt().sock != nullptr;
}

void notify_subscribe(NotifyHandler handler) noexcept {
  try {
    for (NotifyHandler h : nrt().handlers) {
      if (h == handler) return;
    }
    nrt().handlers.push_back(handler);
  } catch (...) {
  }
}

void notify_wake(std::int32_t pid) noexcept {
  NotifyRuntime& r = nrt();
  if (pid <= 0) return;
  if (pid == ngx_pid) {
    if (r.local.handler != nullptr && !r.local.posted) {
      ngx_post_event(&r.local, &ngx_posted_events);  // a multi-statement macro
    }
    return;
  }
  if (r.sock == nullptr) return;
  socklen_t len = 0;
  const sockaddr_un a = address_of(pid, len);
  const char byte = 1;
  const ssize_t n = ::sendto(r.sock->fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL,
                             reinterpret_cast<const sockaddr*>(&a), len);
  // EAGAIN: its queue is full, so it has wake-ups pending anyway; ECONNREFUSED: it is gone.
  if (n == 1) {
    ++r.stats.sent;
  } else {
    ++r.stats.failed;
  }
}

NotifyStats notify_stats() noexcept {
  return nrt().stats;
}

}  // namespace omni::ngx
