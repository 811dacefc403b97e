// WorkQueue: runs closures one at a time, in the order they were pushed, on one worker thread.
//
// A process group uses it for its async operations: every rank pushes its operations in
// program order, so the worker issues them in the same order on every rank (which collective
// libraries require), while the calling thread computes. The thread starts with the first
// push, so groups that never go async cost no thread.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "parallel/process_group.h"

namespace mop {

class WorkQueue {
 public:
  WorkQueue() = default;
  // Runs what is still queued (the peers expect it), then stops the thread.
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Queues fn; the Work's wait() rethrows whatever fn threw.
  std::unique_ptr<Work> push(std::function<void()> fn);

  // Queues fn with no Work to wait on: fn reports its own errors (it must not throw).
  void post(std::function<void()> fn);

  // Returns once everything pushed so far has finished (errors stay with their Work).
  void drain();

 private:
  struct Task {
    std::function<void()> fn;
    std::promise<void> done;
  };
  void enqueue(Task task);
  void loop();

  std::mutex mu_;
  std::condition_variable cv_;       // the worker waits for tasks or stop
  std::condition_variable idle_cv_;  // drain() waits for pending_ == 0
  std::deque<Task> tasks_;
  size_t pending_ = 0;  // queued + running
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace mop
