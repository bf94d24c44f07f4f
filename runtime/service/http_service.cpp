#include "http_service.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <deque>
#include <functional>
#include <optional>

#include "bounded_server.h"
#include "completions.h"
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

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// The two APIs answer errors in their own shapes: {"error": "..."} and OpenAI's {"error": {...}}.
enum class Api { generate, openai };

// How a streamed response is written: its content type, one token, and its end (result or error).
struct StreamFormat {
  const char* content_type;
  std::function<std::string(int64_t)> token;
  std::function<std::string(const GenerateResult&)> end;
};

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
      : model_name_(options.model_name.empty() ? "adafuse" : options.model_name),
        started_(std::time(nullptr)),
        scheduler_(backend, options.queue_capacity, metrics_, options.step_tokens),
        server_(connection_limits(options)) {
    server_.on_refusal = [this](int status) { metrics_.request(status); };
    // Readiness: 503 once the engine can run nothing more (a load balancer takes the instance out).
    server_.Get("/health", [this](const httplib::Request&, httplib::Response& res) { health(res, true); });
    // Liveness: the same engine state, without the engine's details (see runtime/README.md).
    server_.Get("/health/live", [this](const httplib::Request&, httplib::Response& res) { health(res, false); });
    server_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics_.prometheus(), "text/plain; version=0.0.4");
    });
    server_.Post("/v1/generate", [this](const httplib::Request& req, httplib::Response& res) { generate(req, res); });
    server_.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) { complete(req, res); });
    server_.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(models_response(model_name_, started_), "application/json");
    });
    server_.set_exception_handler([this](const httplib::Request& req, httplib::Response& res, std::exception_ptr) {
      reply_error(res, 500, "internal error while answering the request", api_of(req));
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
  static Api api_of(const httplib::Request& req) { return req.path.rfind("/v1/completions", 0) == 0 ? Api::openai : Api::generate; }

  void health(httplib::Response& res, bool details) {
    const std::string unusable = scheduler_.unusable_reason();
    if (!unusable.empty()) {
      res.status = 503;
      res.set_content(dump(json{{"status", "unavailable"}, {"error", unusable}}), "application/json");
      return;
    }
    const BackendInfo& info = scheduler_.info();
    res.set_content(details ? json{{"status", "ok"}, {"backend", info.description}, {"model", model_name_}, {"max_batch", info.max_batch},
                                   {"max_seq", info.max_seq}, {"vocab", info.vocab}}.dump()
                            : json{{"status", "ok"}}.dump(),
                    "application/json");
  }

  void reply_error(httplib::Response& res, int status, const std::string& message, Api api) {
    metrics_.request(status);
    res.status = status;
    if (status == 503) res.set_header("Retry-After", "1");
    res.set_content(api == Api::openai ? openai_error(message, status) : dump(json{{"error", message}}) + "\n", "application/json");
  }

  // Checks a parsed request and queues it; false once an error was answered.
  bool admit(const std::shared_ptr<GenerateRequest>& request, httplib::Response& res, Api api) {
    try {
      scheduler_.check(*request);
    } catch (const Error& e) {
      reply_error(res, 400, e.what(), api);
      return false;
    }
    const std::string unusable = scheduler_.unusable_reason();
    if (!unusable.empty()) {
      reply_error(res, 503, "the engine cannot run after a device error (" + unusable + "); restart the service", api);
      return false;
    }
    if (!scheduler_.submit(request)) {
      reply_error(res, 503, "the request queue is full; retry later", api);
      return false;
    }
    return true;
  }

  // A non-streaming request: runs while its client is there. The worker asks at each token
  // (on_token: false cancels it within the step), this thread while it waits in the queue.
  std::optional<GenerateResult> run_while_client_waits(const std::shared_ptr<GenerateRequest>& request, httplib::Response& res,
                                                       Api api) {
    auto client = watched_client();
    request->on_token = [client](int64_t) { return !client->gone(); };
    auto result = request->done.get_future();
    if (!admit(request, res, api)) return std::nullopt;
    while (result.wait_for(std::chrono::milliseconds(20)) != std::future_status::ready)
      if (client->gone()) request->cancel = true;
    GenerateResult r = result.get();
    if (!r.error.empty()) {
      reply_error(res, 500, r.error, api);
      return std::nullopt;
    }
    if (r.finish_reason == finish_name(Finish::cancelled)) {  // nobody to answer: counted as nginx counts it
      metrics_.request(499);
      res.status = 499;
      return std::nullopt;
    }
    metrics_.request(200);
    return r;
  }

  // A streaming request: tokens are written as they come; the request is cancelled when its client
  // goes (seen by the worker at the next token, or here between writes), and counted when it ends.
  void stream(const std::shared_ptr<GenerateRequest>& request, httplib::Response& res, Api api, StreamFormat format) {
    auto client = watched_client();
    auto channel = std::make_shared<TokenChannel>();
    request->on_token = [channel, client](int64_t token) {
      std::lock_guard<std::mutex> lock(channel->mutex);
      channel->tokens.push_back(token);
      channel->ready.notify_all();
      return !channel->client_gone && !client->gone();
    };
    auto result = request->done.get_future().share();
    if (!admit(request, res, api)) return;
    // Counted once, when the stream ends: 200, 500 (the engine failed after the 200 status line went
    // out: the last event holds the error), or 499 (the client went away before the end).
    auto counted = std::make_shared<std::atomic<bool>>(false);
    auto count = [this, counted](int status) {
      if (!counted->exchange(true)) metrics_.request(status);
    };
    auto gone = [channel, request] {  // called with channel->mutex held
      channel->client_gone = true;
      request->cancel = true;
      return false;
    };
    res.set_chunked_content_provider(
        format.content_type,
        [channel, client, result, count, gone, format](size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> lock(channel->mutex);
          channel->ready.wait_for(lock, std::chrono::milliseconds(50), [&] { return !channel->tokens.empty(); });
          if (client->gone()) return gone();
          while (!channel->tokens.empty()) {
            const std::string text = format.token(channel->tokens.front());
            channel->tokens.pop_front();
            if (!sink.write(text.data(), text.size())) return gone();
          }
          if (result.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return true;
          const GenerateResult& r = result.get();
          if (r.error.empty() && r.finish_reason == finish_name(Finish::cancelled)) return gone();
          const std::string last = format.end(r);
          if (!sink.write(last.data(), last.size())) return gone();
          count(r.error.empty() ? 200 : 500);  // before the end of the stream, so a client that read it sees it counted
          sink.done();
          return true;
        },
        [channel, request, count](bool) {  // the response is dropped: uncounted means cut short
          {
            std::lock_guard<std::mutex> lock(channel->mutex);
            channel->client_gone = true;
          }
          request->cancel = true;
          count(499);
        });
  }

  static std::shared_ptr<ClientWatch> watched_client() {
    auto client = BoundedServer::current_client();
    return client ? client : std::make_shared<ClientWatch>(-1);  // never gone: outside a connection thread
  }

  void generate(const httplib::Request& req, httplib::Response& res) {
    bool streamed = false;
    std::shared_ptr<GenerateRequest> request;
    try {
      request = parse_request(req.body, streamed);
    } catch (const Error& e) {
      return reply_error(res, 400, e.what(), Api::generate);
    }
    auto result_line = [](const GenerateResult& r) {
      return (r.error.empty() ? json{{"tokens", r.tokens}, {"finish_reason", r.finish_reason}} : json{{"error", r.error}}).dump() + "\n";
    };
    if (streamed)
      return stream(request, res, Api::generate,
                    StreamFormat{"application/x-ndjson", [](int64_t t) { return json{{"token", t}}.dump() + "\n"; }, result_line});
    if (auto r = run_while_client_waits(request, res, Api::generate)) res.set_content(result_line(*r), "application/json");
  }

  void complete(const httplib::Request& req, httplib::Response& res) {
    CompletionRequest c;
    try {
      c = parse_completion_request(req.body, model_name_);
    } catch (const ModelNotFound& e) {
      return reply_error(res, 404, e.what(), Api::openai);
    } catch (const Error& e) {
      return reply_error(res, 400, e.what(), Api::openai);
    }
    const CompletionIdentity who = new_completion(model_name_);
    const size_t prompt_tokens = c.request->prompt.size();
    if (c.stream) {
      const bool usage = c.include_usage;
      return stream(c.request, res, Api::openai,
                    StreamFormat{"text/event-stream", [who](int64_t t) { return completion_token_event(who, t); },
                                 [who, prompt_tokens, usage](const GenerateResult& r) {
                                   return completion_end_events(who, prompt_tokens, r, usage);
                                 }});
    }
    if (auto r = run_while_client_waits(c.request, res, Api::openai))
      res.set_content(completion_response(who, prompt_tokens, *r), "application/json");
  }

  const std::string model_name_;
  const std::time_t started_;
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
  else if (flag == "--model-name") {
    if (value.empty()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "--model-name: expected a name, found ''");
    options.model_name = value;
  } else return false;
  return true;
}

int serve(Backend& backend, const ServiceOptions& options) {
  Service service(backend, options);
  return service.listen(options);
}

}  // namespace adafuse
