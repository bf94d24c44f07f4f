// cpp-httplib 0.11's Server with its connections bounded, so that no client can hold the service:
// - one thread per connection (not a fixed pool that idle or slow clients fill), up to
//   max_connections; beyond that a connection gets 503 and is closed;
// - a connection waits at most idle_timeout for a request to begin, and a request's head and body
//   must arrive within request_deadline of its first byte (slow headers: the deadline is total, not
//   per read), at most head_limit + body_limit bytes;
// - request bodies with Transfer-Encoding (chunked: 0.11 reads them without a limit),
//   Content-Encoding (inflated without a limit) or a Content-Length over body_limit (0.11 reads it
//   away before answering) are refused before they are read (411, 415, 413), and the connection closed.
// So /health gets its own thread however many connections are idle or slow (up to max_connections).
// A handler can watch its client (current_client()): generation stops when the client goes away.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>

namespace adafuse {

struct ConnectionLimits {
  size_t max_connections = 1024;
  std::chrono::milliseconds idle_timeout{5000};
  std::chrono::milliseconds request_deadline{10000};
  std::chrono::milliseconds write_timeout{10000};
  size_t head_limit = 64 * 1024;
  size_t body_limit = 1 << 20;
  size_t max_requests_per_connection = 100;
};

// The client of one connection, as a handler (or the worker running its request) sees it: gone()
// once the peer closed or reset the connection. Safe from any thread for as long as it is held:
// the server detaches it before closing the socket, after which gone() is true without touching a
// descriptor that may have been reused.
class ClientWatch {
 public:
  explicit ClientWatch(int sock) : sock_(sock) {}
  // True once the client closed its end (EOF, also a half-close after sending the request), reset
  // the connection, or the server closed it. A non-blocking poll + peek: bytes of a pipelined next
  // request do not count as gone.
  bool gone();
  void detach();

 private:
  std::mutex mutex_;
  int sock_;
  bool gone_ = false;
};

class BoundedServer : public httplib::Server {
 public:
  explicit BoundedServer(const ConnectionLimits& limits);
  ~BoundedServer() override;
  // After bind_to_port: httplib 0.11 listens with a backlog of 5, so a burst of connections waits
  // for SYN retries (1 s each) before the accept loop sees it; this raises it to `backlog`.
  void widen_backlog(int backlog);
  // Called with the status of each answer the server gives itself (503 at the cap, 411, 415).
  std::function<void(int)> on_refusal;
  // The client of the request being handled on this thread (only inside a handler).
  static std::shared_ptr<ClientWatch> current_client();

 private:
  bool process_and_close_socket(socket_t sock) override;
  ConnectionLimits limits_;
  std::atomic<size_t> open_{0};
};

}  // namespace adafuse
