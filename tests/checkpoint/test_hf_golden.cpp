// mop's CPU forward and backward against Hugging Face transformers' Qwen3-MoE (float64 golden
// values made by tools/hf_golden.py, see tests/golden/README.md).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "checkpoint/hf.h"
#include "checkpoint/safetensors.h"
#include "model/decoder.h"

using namespace mop;

namespace {

const std::string kDir = std::string(MOP_SOURCE_DIR) + "/tests/golden/qwen3_tiny";

struct Golden {
  ModelConfig cfg;
  ParamTable table;
  std::vector<float> params;
  int B = 0, T = 0, V = 0;
  std::vector<int32_t> tokens, targets, positions, cu;
  std::vector<double> logits;  // (B, T, V)
  double loss = 0;
  ckpt::SafetensorsFile file{kDir + "/golden.safetensors"};

  Golden() {
    cfg = hf_read_config(kDir);
    cfg.lb_coef = 0;  // the golden loss is cross-entropy only
    table = build_param_table(cfg);
    params.resize(size_t(table.total));
    hf_load_weights(kDir, table, params.data());
    const auto& ids = file.get("input_ids");
    B = int(ids.shape[0]), T = int(ids.shape[1]), V = int(cfg.vocab_size);
    std::vector<int64_t> raw(size_t(B * T));
    file.read_into("input_ids", DType::i64, {B, T}, raw.data());
    // Hugging Face shifts labels = input_ids inside the model: position t predicts token t + 1,
    // the last position of each row predicts nothing. Rows are separate documents here.
    for (int b = 0; b < B; ++b) {
      cu.push_back(b * T);
      for (int t = 0; t < T; ++t) {
        tokens.push_back(int32_t(raw[size_t(b * T + t)]));
        targets.push_back(t + 1 < T ? int32_t(raw[size_t(b * T + t + 1)]) : -100);
        positions.push_back(t);
      }
    }
    cu.push_back(B * T);
    logits.resize(size_t(B) * T * V);
    file.read_into("logits", DType::f64, {B, T, V}, logits.data());
    file.read_into("loss", DType::f64, {}, &loss);
  }
  TokenBatch batch() const {
    return TokenBatch{B * T, tokens.data(), targets.data(), positions.data(), cu.data(), B};
  }
};

// Runs mop's model in precision T and compares logits, loss and every gradient:
//   |ours - golden| <= tol * max |golden| over each tensor.
// The golden model runs in float64 but transformers keeps float32 islands in it (RMSNorm
// upcasts to float32 and casts back, RoPE angles and the router softmax are float32), so the
// reference itself carries float32 rounding: measured relative errors are ~2e-7 = 1.7 eps32.
// Tolerances, from fp32 epsilon:
//   mop in fp64: 16 eps32 = 1.9e-6 (the reference's own rounding, with a 10x margin);
//   mop in fp32: 1024 eps32 = 1.2e-4 (fp32 storage and accumulation through two layers with
//   reductions of at most 259 terms).
// A wrong formula (norm, RoPE layout, routing, renormalisation, loss shift) shows up as errors
// of 1e-2 and more.
template <class T> void compare(const Golden& g) {
  constexpr double eps32 = std::numeric_limits<float>::epsilon();
  const double tol = std::is_same_v<T, double> ? 16 * eps32 : 1024 * eps32;
  std::vector<T> p(g.params.begin(), g.params.end()), grads(p.size(), T(0));
  Decoder<T> m(g.cfg, g.table);
  m.bind(p.data(), grads.data());
  const TokenBatch b = g.batch();
  const int n_targets = g.B * (g.T - 1);
  LossStats st = m.forward_backward(b, T(1) / T(n_targets), T(0), Recompute::none);
  ASSERT_EQ(st.ce_tokens, n_targets);
  EXPECT_NEAR(st.ce_sum / n_targets, g.loss, tol * std::abs(g.loss)) << "loss";

  // Logits of every position (each row is its own document).
  double max_ref = 0, max_err = 0;
  std::vector<T> row(size_t(g.V));
  for (int i = 0; i < g.B * g.T; ++i) {
    m.logits_at(b, i, row.data());
    for (int v = 0; v < g.V; ++v) {
      const double ref = g.logits[size_t(i) * g.V + v];
      max_ref = std::max(max_ref, std::abs(ref));
      max_err = std::max(max_err, std::abs(double(row[size_t(v)]) - ref));
    }
  }
  EXPECT_LE(max_err, tol * max_ref) << "logits: max error " << max_err << " vs max |logit| " << max_ref;

  int checked = 0;
  for (const auto& spec : g.table.params) {
    const std::string key = "grad." + spec.name;
    ASSERT_TRUE(g.file.contains(key)) << key;
    std::vector<double> ref(size_t(spec.numel));
    g.file.read_into(key, DType::f64, spec.shape, ref.data());
    double mref = 0, merr = 0;
    for (int64_t i = 0; i < spec.numel; ++i) {
      mref = std::max(mref, std::abs(ref[size_t(i)]));
      merr = std::max(merr, std::abs(double(grads[size_t(spec.offset + i)]) - ref[size_t(i)]));
    }
    // Experts that got no token have zero gradient in both.
    EXPECT_LE(merr, tol * std::max(mref, 1e-12)) << spec.name << ": max error " << merr << " vs max |grad| " << mref;
    ++checked;
  }
  EXPECT_EQ(checked, int(g.table.params.size()));
}

}  // namespace

TEST(HfGolden, Qwen3MoeFp64MatchesTransformers) {
  Golden g;
  compare<double>(g);
}

TEST(HfGolden, Qwen3MoeFp32MatchesTransformers) {
  Golden g;
  compare<float>(g);
}
