// The exported decoder's tensor contract for the C++ runtime. GENERATED from adafuse_export/onnx/contract.py
// (python -m adafuse_export.onnx.contract > runtime/src/decoder_contract.h); do not edit:
// tests/test_decoder_contract.py checks that it matches. contract.py's docstring says what each tensor means.
#pragma once

namespace adafuse::decoder_contract {

inline constexpr int kVersion = 2;
inline constexpr const char* kPastPrefix = "past_key_values.";  // + layer + ".key" / ".value"
inline constexpr const char* kPresentPrefix = "present.";
inline constexpr const char* kInputIds = "input_ids";  // int64 [batch, seq]
inline constexpr const char* kPastLengths = "past_lengths";  // int64 [batch]
inline constexpr const char* kSeqLens = "seq_lens";  // int64 [batch]
inline constexpr const char* kExpertIds = "expert_ids";  // int32 [batch, seq, top_k]
inline constexpr const char* kGates = "gates";  // float [batch, seq, top_k]
inline constexpr const char* kLogits = "logits";  // float [batch, seq, vocab]

}  // namespace adafuse::decoder_contract
