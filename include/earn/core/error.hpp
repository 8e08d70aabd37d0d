// earn/core/error.hpp - the library's typed exceptions.
#pragma once

#include <stdexcept>
#include <string>

namespace earn {

/// Base of every exception earn throws; catch this to catch them all.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file could not be opened or read.
class IoError : public Error {
 public:
  using Error::Error;
};

/// A file's contents are malformed, truncated or hostile; the message names the file and the field.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// A model configuration, schedule or argument combination is inconsistent (k > layers, no registers...).
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// An index is out of range: a token id outside the vocabulary, a position past the context, a user past the batch.
class RangeError : public Error {
 public:
  using Error::Error;
};

/// A computation produced NaN or Inf where a finite number is required (a training loss or gradient); the message
/// names the step and the tensor.
class NumericError : public Error {
 public:
  using Error::Error;
};

namespace detail {
/// "file: field: what" - the one message shape every loader uses.
[[noreturn]] inline void throw_format(const std::string& file, const std::string& field, const std::string& what) {
  throw FormatError(file + ": " + field + ": " + what);
}
}  // namespace detail

}  // namespace earn
