#include "checkpoint/atomic_dir.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28, _GNU_SOURCE)
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <utility>

#include "core/error.h"

namespace fs = std::filesystem;

namespace mop::ckpt {

namespace {

std::atomic<uint64_t> g_counter{0};
std::atomic<bool> g_force_two_renames{false};

std::string parent_of(const std::string& p) {
  std::string parent = fs::path(p).parent_path().string();
  return parent.empty() ? std::string(".") : parent;
}

void fsync_path(const std::string& p, bool is_dir) {
  int fd = ::open(p.c_str(), (is_dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  MOP_CHECK(fd >= 0, "{}: cannot open for fsync: {}", p, std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some file systems cannot fsync a directory (EINVAL); there is nothing more to do there.
  if (rc != 0 && !(is_dir && err == EINVAL)) MOP_FAIL("{}: fsync failed: {}", p, std::strerror(err));
}

// fsyncs every regular file and directory below `dir`, then `dir` itself.
void fsync_tree(const std::string& dir) {
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, ec), end;
  MOP_CHECK(!ec, "{}: cannot list: {}", dir, ec.message());
  for (; it != end; it.increment(ec)) {
    MOP_CHECK(!ec, "{}: cannot list: {}", dir, ec.message());
    const fs::directory_entry& e = *it;
    if (e.is_symlink(ec)) continue;
    if (e.is_regular_file(ec))
      fsync_path(e.path().string(), false);
    else if (e.is_directory(ec))
      fsync_path(e.path().string(), true);
  }
  MOP_CHECK(!ec, "{}: cannot list: {}", dir, ec.message());
  fsync_path(dir, true);
}

bool exists_nofollow(const std::string& p) {
  struct stat st;
  return ::lstat(p.c_str(), &st) == 0;
}

void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      MOP_FAIL("{}: write failed: {}", path, std::strerror(errno));
    }
    if (w == 0) MOP_FAIL("{}: write failed: wrote 0 bytes (device full?)", path);
    p += w;
    n -= size_t(w);
  }
}

}  // namespace

namespace detail {
void set_atomic_dir_force_two_renames(bool on) { g_force_two_renames = on; }
}  // namespace detail

AtomicDir::AtomicDir(std::string final_path) : final_(std::move(final_path)) {
  while (final_.size() > 1 && final_.back() == '/') final_.pop_back();
  MOP_CHECK(!final_.empty() && final_ != "/" && final_ != "." && final_ != "..",
            "AtomicDir: invalid checkpoint directory '{}'", final_);
  const std::string parent = parent_of(final_);
  std::error_code ec;
  fs::create_directories(parent, ec);
  MOP_CHECK(!ec, "{}: cannot create directory: {}", parent, ec.message());
  const long pid = long(::getpid());
  for (;;) {
    std::string tmp = fmt::format("{}.tmp-{}-{}", final_, pid, g_counter.fetch_add(1));
    if (::mkdir(tmp.c_str(), 0755) == 0) {
      tmp_ = std::move(tmp);
      break;
    }
    // A leftover of an earlier process with the same pid: take the next counter.
    MOP_CHECK(errno == EEXIST, "{}: cannot create directory: {}", tmp, std::strerror(errno));
  }
}

AtomicDir::AtomicDir(AtomicDir&& o) noexcept
    : final_(std::move(o.final_)), tmp_(std::move(o.tmp_)), committed_(o.committed_) {
  o.tmp_.clear();
  o.committed_ = true;  // the moved-from object owns nothing to clean up
}

AtomicDir::~AtomicDir() {
  if (!committed_ && !tmp_.empty()) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);  // best effort; a destructor must not throw
  }
}

std::string AtomicDir::path(const std::string& filename) const {
  MOP_CHECK(!committed_, "{}: AtomicDir already committed; cannot add '{}'", final_, filename);
  MOP_CHECK(!filename.empty() && filename != "." && filename != ".." &&
                filename.find('/') == std::string::npos,
            "{}: invalid file name '{}' (a plain name without '/')", final_, filename);
  return tmp_ + "/" + filename;
}

void AtomicDir::commit() {
  MOP_CHECK(!committed_, "{}: AtomicDir committed twice", final_);
  fsync_tree(tmp_);
  const std::string parent = parent_of(final_);

  if (!exists_nofollow(final_)) {
    MOP_CHECK(::rename(tmp_.c_str(), final_.c_str()) == 0, "cannot rename {} to {}: {}", tmp_, final_,
              std::strerror(errno));
    committed_ = true;
    fsync_path(parent, true);
    return;
  }

  // Replace: prefer an atomic exchange, so the final name never disappears even briefly.
  if (!g_force_two_renames) {
    if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, final_.c_str(), RENAME_EXCHANGE) == 0) {
      committed_ = true;  // tmp_ now holds the previous directory
      fsync_path(parent, true);
      std::error_code ec;
      fs::remove_all(tmp_, ec);  // best effort: the new checkpoint is already published
      return;
    }
    int err = errno;
    MOP_CHECK(err == EINVAL || err == ENOSYS || err == ENOTSUP || err == EOPNOTSUPP,
              "cannot exchange {} and {}: {}", tmp_, final_, std::strerror(err));
  }

  const std::string old = fmt::format("{}.old-{}", final_, long(::getpid()));
  std::error_code ec;
  if (exists_nofollow(old)) {
    fs::remove_all(old, ec);
    MOP_CHECK(!ec, "{}: cannot remove stale directory: {}", old, ec.message());
  }
  MOP_CHECK(::rename(final_.c_str(), old.c_str()) == 0, "cannot rename {} to {}: {}", final_, old,
            std::strerror(errno));
  if (::rename(tmp_.c_str(), final_.c_str()) != 0) {
    int err = errno;
    bool restored = ::rename(old.c_str(), final_.c_str()) == 0;
    MOP_FAIL("cannot rename {} to {}: {}{}", tmp_, final_, std::strerror(err),
             restored ? "" : fmt::format(" (and the previous directory could not be moved back from {})", old));
  }
  committed_ = true;
  fsync_path(parent, true);
  fs::remove_all(old, ec);  // best effort: the new checkpoint is already published
}

void write_text_file_atomic(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MOP_CHECK(fd >= 0, "{}: cannot open for writing: {}", tmp, std::strerror(errno));
  try {
    write_all(fd, contents.data(), contents.size(), tmp);
    MOP_CHECK(::fsync(fd) == 0, "{}: fsync failed: {}", tmp, std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    MOP_FAIL("{}: close after writing failed: {}", tmp, std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    MOP_FAIL("cannot rename {} to {}: {}", tmp, path, std::strerror(err));
  }
  fsync_path(parent_of(path), true);
}

}  // namespace mop::ckpt
