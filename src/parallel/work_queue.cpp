#include "parallel/work_queue.h"

#include <chrono>

namespace mop {
namespace {

class QueuedWork final : public Work {
 public:
  explicit QueuedWork(std::shared_future<void> f) : f_(std::move(f)) {}
  // The operation still uses the caller's buffers: do not return before it has finished.
  ~QueuedWork() override { f_.wait(); }
  void wait() override { f_.get(); }
  bool done() override { return f_.wait_for(std::chrono::seconds(0)) == std::future_status::ready; }

 private:
  std::shared_future<void> f_;
};

}  // namespace

WorkQueue::~WorkQueue() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

std::unique_ptr<Work> WorkQueue::push(std::function<void()> fn) {
  Task task{std::move(fn), {}};
  auto work = std::make_unique<QueuedWork>(task.done.get_future().share());
  enqueue(std::move(task));
  return work;
}

void WorkQueue::post(std::function<void()> fn) { enqueue(Task{std::move(fn), {}}); }

void WorkQueue::enqueue(Task task) {
  {
    std::lock_guard lk(mu_);
    tasks_.push_back(std::move(task));
    ++pending_;
    if (!worker_.joinable()) worker_ = std::thread([this] { loop(); });
  }
  cv_.notify_one();
}

void WorkQueue::drain() {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return pending_ == 0; });
}

void WorkQueue::loop() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !tasks_.empty(); });
    if (tasks_.empty()) return;  // stop_ and nothing left
    Task task = std::move(tasks_.front());
    tasks_.pop_front();
    lk.unlock();
    try {
      task.fn();
      task.done.set_value();
    } catch (...) {
      task.done.set_exception(std::current_exception());
    }
    lk.lock();
    if (--pending_ == 0) idle_cv_.notify_all();
  }
}

}  // namespace mop
