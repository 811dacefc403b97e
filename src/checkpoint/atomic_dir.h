// Atomic publication of a checkpoint directory.
//
//   AtomicDir dir("runs/x/step_000100");
//   writer.write(dir.path("model.safetensors"));
//   dir.commit();   // fsync files + dir, then rename into place, fsync the parent
//
// Files are written into a fresh sibling "<final>.tmp-<pid>-<counter>"; commit() makes them
// durable and swaps the directory in under the final name. An AtomicDir destroyed without
// commit() (exception, early return) removes its temporary directory, so the previous
// checkpoint under the final name stays intact and no partial one appears there.
#pragma once
#include <string>

namespace mop::ckpt {

class AtomicDir {
 public:
  // Creates the temporary directory (and any missing parent directories of final_path).
  // Trailing slashes of final_path are ignored.
  explicit AtomicDir(std::string final_path);
  ~AtomicDir();  // removes the temporary directory unless committed
  AtomicDir(AtomicDir&& other) noexcept;
  AtomicDir& operator=(AtomicDir&& other) = delete;
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;

  // Path of `filename` (a plain name, no '/') inside the temporary directory.
  std::string path(const std::string& filename) const;

  // fsyncs every file in the temporary directory and the directory itself, then publishes
  // it under the final name: a plain rename when the final name is free; otherwise the old
  // directory is swapped out (atomic RENAME_EXCHANGE where the file system supports it,
  // else rename final -> "<final>.old-<pid>", rename tmp -> final) and removed. Finally
  // fsyncs the parent directory. At most once.
  void commit();

  const std::string& final_path() const { return final_; }
  const std::string& temp_path() const { return tmp_; }
  bool committed() const { return committed_; }

 private:
  std::string final_;
  std::string tmp_;
  bool committed_ = false;
};

// Writes `contents` to "<path>.tmp", fsyncs it, renames it over `path` and fsyncs the parent
// directory: readers see either the old or the new contents. For small files such as a
// `latest` pointer.
void write_text_file_atomic(const std::string& path, const std::string& contents);

namespace detail {
// Tests only: skip RENAME_EXCHANGE and use the two-rename replacement.
void set_atomic_dir_force_two_renames(bool on);
}  // namespace detail

}  // namespace mop::ckpt
