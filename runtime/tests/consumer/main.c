/* Uses the installed C API from C: version, a greedy and a seeded sampler, and an engine refusal.
 * Usage: consumer [ENGINE]  (prints one line per check). */
#include <adafuse/runtime.h>
#include <stdio.h>

int main(int argc, char** argv) {
  printf("version %s plugin %s\n", adafuse_version(), adafuse_plugin_version());
  const float logits[4] = {0.5f, 3.0f, -1.0f, 2.0f};
  adafuse_sampling options = adafuse_sampling_default();
  adafuse_sampler* sampler = NULL;
  int64_t token = -1;
  if (adafuse_sampler_create(&options, &sampler) != ADAFUSE_OK || adafuse_sampler_next(sampler, logits, 4, &token) != ADAFUSE_OK) {
    printf("error %s\n", adafuse_last_error());
    return 1;
  }
  printf("greedy %lld\n", (long long)token);
  adafuse_sampler_free(sampler);
  if (argc > 1) {
    adafuse_open_options open = adafuse_open_options_default();
    adafuse_engine* engine = NULL;
    open.engine_path = argv[1];
    adafuse_status status = adafuse_engine_open(&open, &engine);
    printf("open status %d: %s\n", (int)status, adafuse_last_error());
    adafuse_engine_free(engine);
  }
  return 0;
}
