// Errors: one exception type carrying the failed expression, file and line.
// Library code throws; only main() prints and sets the exit code.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace mop {

class Error : public std::runtime_error {
 public:
  Error(std::string msg, const char* file, int line)
      : std::runtime_error(std::move(msg)), file_(file), line_(line) {}
  const char* file() const { return file_; }
  int line() const { return line_; }

 private:
  const char* file_;
  int line_;
};

// An allocation that did not fit; what() carries the memory breakdown.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

}  // namespace mop

// MOP_CHECK(cond, "fmt {}", args...): throws mop::Error with the message when cond is false.
#define MOP_CHECK(cond, ...)                                                              \
  do {                                                                                    \
    if (!(cond)) [[unlikely]]                                                             \
      throw ::mop::Error(::fmt::format(__VA_ARGS__), __FILE__, __LINE__);                 \
  } while (0)

#define MOP_FAIL(...) throw ::mop::Error(::fmt::format(__VA_ARGS__), __FILE__, __LINE__)

// Internal invariant: names the expression, for bugs rather than user errors.
#define MOP_ASSERT(cond)                                                                  \
  do {                                                                                    \
    if (!(cond)) [[unlikely]]                                                             \
      throw ::mop::Error(::fmt::format("internal check failed: {} ({}:{})", #cond,        \
                                       __FILE__, __LINE__),                               \
                         __FILE__, __LINE__);                                             \
  } while (0)
