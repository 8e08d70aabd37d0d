// earn/attention/row_kind.hpp - what a row of the EARN input is, so policies can decide which rows stay.
#pragma once

#include <cstdint>

namespace earn {

/// The role of one row of [R_prefix; prompt; R_suffix; generated].
enum class RowKind : std::uint8_t {
  kPrefixRegister,  ///< learned register before the prompt
  kPrompt,          ///< a prompt token (the user's history and template)
  kSuffixRegister,  ///< learned register after the prompt
  kGenerated,       ///< a token produced by decoding
};

/// The kind's name in logs and CSV files: prefix_register, prompt, suffix_register, generated.
constexpr const char* row_kind_name(RowKind k) {
  switch (k) {
    case RowKind::kPrefixRegister: return "prefix_register";
    case RowKind::kPrompt: return "prompt";
    case RowKind::kSuffixRegister: return "suffix_register";
    case RowKind::kGenerated: return "generated";
  }
  return "?";
}

}  // namespace earn
