#include "bounded_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

namespace adafuse {
namespace {

using Clock = std::chrono::steady_clock;

// Set by the pre-routing refusal on this connection's thread: the body was not read, so the
// connection cannot carry another request.
thread_local bool close_after_response = false;
// The client of the connection this thread serves.
thread_local std::shared_ptr<ClientWatch> this_client;

int remaining_ms(Clock::time_point deadline, std::chrono::milliseconds cap) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() <= 0) return 0;
  return static_cast<int>(std::min(left, cap).count());
}

bool wait_for(int fd, short events, int timeout_ms) {
  pollfd p{fd, events, 0};
  for (;;) {
    const int r = ::poll(&p, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    return r > 0 && (p.revents & (events | POLLHUP | POLLERR)) != 0;
  }
}

// A socket stream whose reads stop at a deadline and a byte budget set per request.
class DeadlineStream : public httplib::Stream {
 public:
  DeadlineStream(int sock, std::chrono::milliseconds write_timeout) : sock_(sock), write_timeout_(write_timeout) {}

  void begin_request(Clock::time_point deadline, size_t budget) {
    deadline_ = deadline;
    budget_ = budget;
    cut_ = false;
  }
  // True when a read of this request was refused (deadline passed or byte budget spent): whatever
  // httplib answered, the connection cannot carry another request.
  bool cut() const { return cut_; }
  bool has_buffered() const { return pos_ < len_; }

  bool is_readable() const override {
    return has_buffered() || wait_for(sock_, POLLIN, remaining_ms(deadline_, std::chrono::milliseconds(60000)));
  }
  bool is_writable() const override { return wait_for(sock_, POLLOUT, static_cast<int>(write_timeout_.count())); }

  ssize_t read(char* ptr, size_t size) override {
    if (!has_buffered()) {
      // More bytes than a request may have, or later than its deadline.
      if (budget_ == 0 || !wait_for(sock_, POLLIN, remaining_ms(deadline_, std::chrono::milliseconds(60000)))) {
        cut_ = true;
        return -1;
      }
      ssize_t n;
      do n = ::recv(sock_, buf_, std::min(sizeof(buf_), budget_), 0);
      while (n < 0 && errno == EINTR);
      if (n <= 0) return n;
      budget_ -= static_cast<size_t>(n);
      pos_ = 0;
      len_ = static_cast<size_t>(n);
    }
    const size_t n = std::min(size, len_ - pos_);
    std::memcpy(ptr, buf_ + pos_, n);
    pos_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (!is_writable()) return -1;
    ssize_t n;
    do n = ::send(sock_, ptr, size, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n;
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override { address(true, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { address(false, ip, port); }
  socket_t socket() const override { return sock_; }

 private:
  void address(bool peer, std::string& ip, int& port) const {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    auto* sa = reinterpret_cast<sockaddr*>(&addr);
    if ((peer ? ::getpeername(sock_, sa, &len) : ::getsockname(sock_, sa, &len)) != 0) return;
    char text[INET6_ADDRSTRLEN] = {};
    if (addr.ss_family == AF_INET) {
      const auto* in = reinterpret_cast<sockaddr_in*>(&addr);
      ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
      port = ntohs(in->sin_port);
    } else if (addr.ss_family == AF_INET6) {
      const auto* in6 = reinterpret_cast<sockaddr_in6*>(&addr);
      ::inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
      port = ntohs(in6->sin6_port);
    }
    ip = text;
  }

  int sock_;
  std::chrono::milliseconds write_timeout_;
  Clock::time_point deadline_{};
  size_t budget_ = 0;
  bool cut_ = false;
  char buf_[4096];
  size_t pos_ = 0, len_ = 0;
};

// One detached thread per connection; shutdown() waits for them all.
class ThreadPerConnection : public httplib::TaskQueue {
 public:
  void enqueue(std::function<void()> fn) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++running_;
    }
    auto task = [this, fn = std::move(fn)] {
      fn();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--running_ == 0) idle_.notify_all();
    };
    try {
      std::thread(task).detach();
    } catch (const std::system_error&) {
      task();  // no thread to be had: answer (the connection cap's 503) on the accept thread
    }
  }
  void shutdown() override {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [this] { return running_ == 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable idle_;
  size_t running_ = 0;
};

void send_all(int sock, const std::string& text) {
  size_t done = 0;
  while (done < text.size() && wait_for(sock, POLLOUT, 1000)) {
    const ssize_t n = ::send(sock, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

}  // namespace

BoundedServer::BoundedServer(const ConnectionLimits& limits) : limits_(limits) {
  new_task_queue = [] { return new ThreadPerConnection(); };
  set_payload_max_length(limits.body_limit);
  // What httplib announces in Keep-Alive headers; process_and_close_socket enforces it.
  set_keep_alive_max_count(limits.max_requests_per_connection);
  set_keep_alive_timeout(std::max<time_t>(1, static_cast<time_t>(limits.idle_timeout.count() / 1000)));
  // A request httplib refused itself (413 body too long, 414 URI too long, 400 unreadable head) may
  // leave its body unread on the socket: such a connection is closed after the answer.
  set_logger([](const httplib::Request&, const httplib::Response& res) {
    if (res.status == 400 || res.status == 413 || res.status == 414 || res.status == 431) close_after_response = true;
  });
  set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    int status = 0;
    std::string why;
    if (req.has_header("Transfer-Encoding")) {
      status = 411;
      why = "request bodies with Transfer-Encoding are not accepted; send Content-Length (at most " +
            std::to_string(limits_.body_limit) + " bytes)";
    } else if (req.has_header("Content-Encoding") && req.get_header_value("Content-Encoding") != "identity") {
      status = 415;
      why = "compressed request bodies (Content-Encoding) are not accepted";
    }
    if (status == 0 && req.has_header("Content-Length")) {
      // httplib 0.11 reads an over-long body away before answering 413: answer before reading it.
      const std::string text = req.get_header_value("Content-Length");
      char* rest = nullptr;
      errno = 0;
      const unsigned long long n = std::strtoull(text.c_str(), &rest, 10);
      if (text.empty() || *rest != '\0' || errno != 0 || !std::isdigit(static_cast<unsigned char>(text[0]))) {
        status = 400;
        why = "Content-Length must be a non-negative integer";
      } else if (n > limits_.body_limit) {
        status = 413;
        why = "request body of " + text + " bytes, more than the " + std::to_string(limits_.body_limit) + " accepted";
      }
    }
    if (status == 0) return httplib::Server::HandlerResponse::Unhandled;
    close_after_response = true;
    res.status = status;
    res.set_header("Connection", "close");
    res.set_content("{\"error\": \"" + why + "\"}\n", "application/json");
    if (on_refusal) on_refusal(status);
    return httplib::Server::HandlerResponse::Handled;
  });
}

BoundedServer::~BoundedServer() = default;

bool ClientWatch::gone() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (gone_) return true;
  pollfd p{sock_, POLLIN | POLLRDHUP, 0};
  int r;
  do r = ::poll(&p, 1, 0);
  while (r < 0 && errno == EINTR);
  if (r > 0 && (p.revents & (POLLHUP | POLLERR | POLLRDHUP)) != 0) {
    gone_ = true;
  } else if (r > 0 && (p.revents & POLLIN) != 0) {
    char byte;
    ssize_t n;
    do n = ::recv(sock_, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    gone_ = n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }
  return gone_;
}

void ClientWatch::detach() {
  std::lock_guard<std::mutex> lock(mutex_);
  gone_ = true;
  sock_ = -1;
}

std::shared_ptr<ClientWatch> BoundedServer::current_client() { return this_client; }

void BoundedServer::widen_backlog(int backlog) {
  if (svr_sock_ != INVALID_SOCKET) ::listen(svr_sock_, backlog);  // Linux updates a listening socket's backlog
}

bool BoundedServer::process_and_close_socket(socket_t sock) {
  struct Slot {
    std::atomic<size_t>& n;
    ~Slot() { --n; }
  } slot{open_};
  if (++open_ > limits_.max_connections) {
    send_all(sock, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                   "Content-Length: 47\r\n\r\n{\"error\": \"too many connections; retry later\"}\n");
    if (on_refusal) on_refusal(503);
  } else {
    DeadlineStream stream(sock, limits_.write_timeout);
    close_after_response = false;
    this_client = std::make_shared<ClientWatch>(sock);
    for (size_t n = 0; n < limits_.max_requests_per_connection && is_running(); ++n) {
      // An idle connection is closed after idle_timeout; a request then has request_deadline in all.
      if (!stream.has_buffered() && !wait_for(sock, POLLIN, static_cast<int>(limits_.idle_timeout.count()))) break;
      stream.begin_request(Clock::now() + limits_.request_deadline, limits_.head_limit + limits_.body_limit);
      bool closed = false;
      const bool last = n + 1 == limits_.max_requests_per_connection;
      if (!process_request(stream, last, closed, nullptr) || closed || close_after_response || stream.cut()) break;
    }
    this_client->detach();  // before the descriptor can be reused
    this_client.reset();
  }
  ::shutdown(sock, SHUT_RDWR);
  ::close(sock);
  return true;
}

}  // namespace adafuse
