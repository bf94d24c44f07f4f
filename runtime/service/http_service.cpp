#include "http_service.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdio>
#include <set>

#include "error.h"
#include "scheduler.h"

namespace adafuse {
namespace {

using nlohmann::json;

httplib::Server* running_server = nullptr;

void on_signal(int) {
  if (running_server != nullptr) running_server->stop();
}

int64_t integer_field(const json& body, const char* name, int64_t fallback, int64_t low, int64_t high) {
  if (!body.contains(name)) return fallback;
  const json& v = body[name];
  if (!v.is_number_integer() || v.get<int64_t>() < low || v.get<int64_t>() > high)
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be an integer in [" + std::to_string(low) + ", " +
                                           std::to_string(high) + "], found " + v.dump());
  return v.get<int64_t>();
}

float number_field(const json& body, const char* name, float fallback) {
  if (!body.contains(name)) return fallback;
  if (!body[name].is_number()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be a number, found " + body[name].dump());
  return body[name].get<float>();
}

std::vector<int64_t> ids_field(const json& body, const char* name, bool required) {
  if (!body.contains(name)) {
    if (required) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' is required (a list of token ids)");
    return {};
  }
  const json& v = body[name];
  if (!v.is_array()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must be a list of token ids, found " + v.dump());
  std::vector<int64_t> ids;
  for (const json& id : v) {
    if (!id.is_number_integer())
      fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("'") + name + "' must hold integer token ids, found " + id.dump());
    ids.push_back(id.get<int64_t>());
  }
  return ids;
}

// The request body as a checked GenerateRequest; stream tells whether to answer as ndjson.
std::shared_ptr<GenerateRequest> parse_request(const std::string& text, bool& stream) {
  json body;
  try {
    body = json::parse(text);
  } catch (const json::parse_error& e) {
    fail(ADAFUSE_ERR_INVALID_ARGUMENT, "malformed JSON at byte " + std::to_string(e.byte));
  }
  if (!body.is_object()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, std::string("expected a JSON object, found ") + body.type_name());
  static const std::set<std::string> known = {"prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                                              "stop_ids", "stream"};
  for (const auto& [key, value] : body.items())
    if (!known.count(key)) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "unknown field '" + key + "'");
  auto request = std::make_shared<GenerateRequest>();
  request->prompt = ids_field(body, "prompt_ids", true);
  request->options.max_new_tokens = static_cast<int32_t>(integer_field(body, "max_new_tokens", 16, 1, INT32_MAX));
  request->options.sampling.temperature = number_field(body, "temperature", 0.0f);
  request->options.sampling.top_k = static_cast<int32_t>(integer_field(body, "top_k", 0, 0, INT32_MAX));
  request->options.sampling.top_p = number_field(body, "top_p", 1.0f);
  request->options.sampling.seed = static_cast<uint64_t>(integer_field(body, "seed", 0, 0, INT64_MAX));
  request->options.stop_ids = ids_field(body, "stop_ids", false);
  stream = false;
  if (body.contains("stream")) {
    if (!body["stream"].is_boolean()) fail(ADAFUSE_ERR_INVALID_ARGUMENT, "'stream' must be true or false, found " + body["stream"].dump());
    stream = body["stream"].get<bool>();
  }
  return request;
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
  Service(Backend& backend, const ServiceOptions& options) : scheduler_(backend, options.queue_capacity, metrics_) {
    server_.set_payload_max_length(options.max_body_bytes);
    server_.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const BackendInfo& info = scheduler_.info();
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
    res.set_content(json{{"error", message}}.dump() + "\n", "application/json");
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
    metrics_.request(200);
    res.set_chunked_content_provider("application/x-ndjson", [channel, result](size_t, httplib::DataSink& sink) {
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
        sink.write(last.data(), last.size());
        sink.done();
      }
      return true;
    });
  }

  void answer(httplib::Response& res, const GenerateResult& r) {
    if (!r.error.empty()) return reply_error(res, 500, r.error);
    metrics_.request(200);
    res.set_content(result_json(r).dump() + "\n", "application/json");
  }

  Metrics metrics_;
  Scheduler scheduler_;
  httplib::Server server_;
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
  else return false;
  return true;
}

int serve(Backend& backend, const ServiceOptions& options) {
  Service service(backend, options);
  return service.listen(options);
}

}  // namespace adafuse
