#include "http_service.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <set>

#include "bounded_server.h"
#include "error.h"
#include "request.h"
#include "scheduler.h"

namespace adafuse {
namespace {

using nlohmann::json;

httplib::Server* running_server = nullptr;

ConnectionLimits connection_limits(const ServiceOptions& o) {
  ConnectionLimits l;
  l.max_connections = o.max_connections;
  l.idle_timeout = std::chrono::milliseconds(o.idle_timeout_ms);
  l.request_deadline = std::chrono::milliseconds(o.request_deadline_ms);
  l.body_limit = o.max_body_bytes;
  return l;
}

void on_signal(int) {
  if (running_server != nullptr) running_server->stop();
}

json result_json(const GenerateResult& r) { return json{{"tokens", r.tokens}, {"finish_reason", r.finish_reason}}; }

// Tokens handed from the worker to a streaming response.
struct TokenChannel {
  std::mutex mutex;
  std::condition_variable ready;
  std::deque<int64_t> tokens;
  bool client_gone = false;
};

class Service {
 public:
  Service(Backend& backend, const ServiceOptions& options)
      : scheduler_(backend, options.queue_capacity, metrics_, options.step_tokens), server_(connection_limits(options)) {
    server_.on_refusal = [this](int status) { metrics_.request(status); };
    server_.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const BackendInfo& info = scheduler_.info();
      const std::string unusable = scheduler_.unusable_reason();
      if (!unusable.empty()) {  // not ready: a load balancer takes this instance out of rotation
        res.status = 503;
        res.set_content(json{{"status", "unavailable"}, {"error", unusable}}.dump(-1, ' ', false, json::error_handler_t::replace),
                        "application/json");
        return;
      }
      res.set_content(json{{"status", "ok"}, {"backend", info.description}, {"max_batch", info.max_batch},
                           {"max_seq", info.max_seq}, {"vocab", info.vocab}}.dump(),
                      "application/json");
    });
    server_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics_.prometheus(), "text/plain; version=0.0.4");
    });
    server_.Post("/v1/generate", [this](const httplib::Request& req, httplib::Response& res) { generate(req, res); });
    server_.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
      reply_error(res, 500, "internal error while answering the request");
    });
  }

  int listen(const ServiceOptions& options) {
    int port = options.port;
    if (port == 0) {
      port = server_.bind_to_any_port(options.host.c_str());
    } else if (!server_.bind_to_port(options.host.c_str(), port)) {
      port = -1;
    }
    if (port < 0) {
      std::fprintf(stderr, "adafuse-serve: cannot listen on %s:%d\n", options.host.c_str(), options.port);
      return 1;
    }
    server_.widen_backlog(static_cast<int>(std::min<size_t>(options.max_connections, 4096)));
    std::printf("listening on http://%s:%d\n", options.host.c_str(), port);
    std::fflush(stdout);
    running_server = &server_;
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    const bool ok = server_.listen_after_bind();
    running_server = nullptr;
    return ok ? 0 : 1;
  }

 private:
  void reply_error(httplib::Response& res, int status, const std::string& message) {
    metrics_.request(status);
    res.status = status;
    res.set_content(json{{"error", message}}.dump(-1, ' ', false, json::error_handler_t::replace) + "\n", "application/json");
  }

  void generate(const httplib::Request& req, httplib::Response& res) {
    bool stream = false;
    std::shared_ptr<GenerateRequest> request;
    try {
      request = parse_request(req.body, stream);
      scheduler_.check(*request);
    } catch (const Error& e) {
      return reply_error(res, 400, e.what());
    }
    const std::string unusable = scheduler_.unusable_reason();
    if (!unusable.empty()) return reply_error(res, 503, "the engine cannot run after a device error (" + unusable + "); restart the service");
    auto result = request->done.get_future().share();
    if (!stream) {
      if (!scheduler_.submit(request)) return reply_error(res, 503, "the request queue is full; retry later");
      return answer(res, result.get());
    }
    auto channel = std::make_shared<TokenChannel>();
    request->on_token = [channel](int64_t token) {
      std::lock_guard<std::mutex> lock(channel->mutex);
      channel->tokens.push_back(token);
      channel->ready.notify_all();
      return !channel->client_gone;
    };
    if (!scheduler_.submit(request)) return reply_error(res, 503, "the request queue is full; retry later");
    // Counted when the stream ends, with its outcome: 200, 500 (the engine failed after the 200 status
    // line went out: the last line holds the error), or 499 (the client went away before the end).
    auto counted = std::make_shared<std::atomic<bool>>(false);
    auto count = [this, counted](int status) {
      if (!counted->exchange(true)) metrics_.request(status);
    };
    res.set_chunked_content_provider("application/x-ndjson", [channel, result, count](size_t, httplib::DataSink& sink) {
      std::unique_lock<std::mutex> lock(channel->mutex);
      channel->ready.wait_for(lock, std::chrono::milliseconds(50), [&] { return !channel->tokens.empty(); });
      while (!channel->tokens.empty()) {
        const std::string line = json{{"token", channel->tokens.front()}}.dump() + "\n";
        channel->tokens.pop_front();
        if (!sink.write(line.data(), line.size())) {
          channel->client_gone = true;
          return false;
        }
      }
      if (result.wait_for(std::chrono::seconds(0)) == std::future_status::ready && channel->tokens.empty()) {
        lock.unlock();
        const GenerateResult& r = result.get();
        const std::string last = (r.error.empty() ? result_json(r) : json{{"error", r.error}}).dump() + "\n";
        if (!sink.write(last.data(), last.size())) return false;
        count(r.error.empty() ? 200 : 500);  // before the end of the stream, so a client that read it sees it counted
        sink.done();
      }
      return true;
    }, [count](bool) { count(499); });  // httplib calls this when the response is dropped: uncounted means cut short
  }

  void answer(httplib::Response& res, const GenerateResult& r) {
    if (!r.error.empty()) return reply_error(res, 500, r.error);
    metrics_.request(200);
    res.set_content(result_json(r).dump() + "\n", "application/json");
  }

  Metrics metrics_;
  Scheduler scheduler_;
  BoundedServer server_;
};

}  // namespace

bool parse_service_option(const std::string& flag, const std::string& value, ServiceOptions& options) {
  auto number = [&](long low, long high) {
    char* rest = nullptr;
    const long v = std::strtol(value.c_str(), &rest, 10);
    if (value.empty() || *rest != '\0' || v < low || v > high)
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, flag + ": expected an integer in [" + std::to_string(low) + ", " + std::to_string(high) +
                                             "], found '" + value + "'");
    return v;
  };
  if (flag == "--host") options.host = value;
  else if (flag == "--port") options.port = static_cast<int>(number(0, 65535));
  else if (flag == "--queue") options.queue_capacity = static_cast<size_t>(number(1, 1 << 20));
  else if (flag == "--max-connections") options.max_connections = static_cast<size_t>(number(1, 1 << 16));
  else if (flag == "--idle-timeout-ms") options.idle_timeout_ms = number(1, 3600000);
  else if (flag == "--request-timeout-ms") options.request_deadline_ms = number(1, 3600000);
  else if (flag == "--step-tokens") options.step_tokens = static_cast<int32_t>(number(1, 1 << 20));
  else return false;
  return true;
}

int serve(Backend& backend, const ServiceOptions& options) {
  Service service(backend, options);
  return service.listen(options);
}

}  // namespace adafuse
