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

}  // namespace earn
