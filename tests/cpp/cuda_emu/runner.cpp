// Runs one launcher of kernels/ under the emulator (cuda_emu.h) on buffers given as files,
// for tests/test_cuda_kernels_emulated.py:
//
//   runner OP --buf NAME:DTYPE:COUNT[:OFFSET] ... --in NAME=FILE ... --out NAME=FILE ...
//          --set KEY=VALUE ...
//
// Every buffer is allocated with exactly COUNT elements (the sanitizers built in catch a
// read or write past either end), OFFSET elements after a 16-byte boundary (misaligned
// rows), holding FILE's bytes for --in, else poisoned with NaN (all bits set). After the
// launch each --in buffer must still hold its file's bytes; each --out buffer is written.
// Prints the launches, one a line. Exit codes: 2 usage, 3 emulator error (cuda_emu.cpp),
// 4 a launcher returned an error, 5 an input was modified.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "layer_norm.h"
#include "softmax.h"

using fastdl::kernels::DType;

cudaError_t emulator_self_check(int what, float* out);  // self_check.cu

namespace {

[[noreturn]] void usage(const std::string& what) {
  std::fprintf(stderr, "runner: %s\n", what.c_str());
  std::exit(2);
}

size_t dtype_bytes(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  usage("bad dtype");
}

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::kFloat32;
  if (s == "float16") return DType::kFloat16;
  if (s == "bfloat16") return DType::kBFloat16;
  if (s == "float64") return DType::kFloat64;
  usage("unknown dtype " + s);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      parts.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  return parts;
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) usage("cannot read " + path);
  std::vector<unsigned char> bytes;
  unsigned char chunk[1 << 16];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, f)) > 0) bytes.insert(bytes.end(), chunk, chunk + n);
  std::fclose(f);
  return bytes;
}

struct Buffer {
  size_t bytes = 0;
  std::unique_ptr<unsigned char[]> storage;  // new[] of exactly offset + bytes
  unsigned char* data = nullptr;
  std::vector<unsigned char> input;  // the file's bytes, for --in buffers
  bool is_input = false;
};

struct Run {
  std::map<std::string, Buffer> buffers;
  std::map<std::string, std::string> settings;

  Buffer& make(const std::string& name, size_t bytes, size_t offset_bytes) {
    Buffer& b = buffers[name];
    b.bytes = bytes;
    // operator new[] aligns to 16; a zero-size buffer still gets a distinct pointer
    b.storage.reset(new unsigned char[offset_bytes + bytes]);
    b.data = b.storage.get() + offset_bytes;
    std::memset(b.data, 0xff, bytes);
    return b;
  }
  void* ptr(const std::string& name) {  // nullptr for a buffer not given
    auto it = buffers.find(name);
    return it == buffers.end() ? nullptr : it->second.data;
  }
  const std::string& get(const std::string& key) {
    auto it = settings.find(key);
    if (it == settings.end()) usage("missing --set " + key);
    return it->second;
  }
  int64_t num(const std::string& key) { return std::strtoll(get(key).c_str(), nullptr, 10); }
  int64_t num(const std::string& key, int64_t fallback) { return settings.count(key) ? num(key) : fallback; }
  bool flag(const std::string& key) { return settings.count(key) && get(key) == "1"; }
};

void check(cudaError_t err, const char* launcher) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s returned cudaError %d (%s)\n", launcher, static_cast<int>(err), cudaGetErrorName(err));
    std::exit(4);
  }
}

// The workspace the softmax launchers want; --set workspace=none gives none, short one
// byte less (both mean one block a row).
void* softmax_workspace(Run& run, DType dtype, int64_t rows, int64_t cols, size_t* bytes) {
  size_t wanted = 0;
  check(fastdl::kernels::softmax_workspace_bytes(dtype, rows, cols, &wanted), "softmax_workspace_bytes");
  const std::string mode = run.settings.count("workspace") ? run.get("workspace") : "full";
  if (mode == "none" || wanted == 0) {
    *bytes = 0;
    return nullptr;
  }
  *bytes = mode == "short" ? wanted - 1 : wanted;
  return run.make("workspace", *bytes, 0).data;
}

// y (softmax forward) / dx (softmax backward) / y and dy (norm forward / backward) in
// --set <key>=..., by default `dtype`
DType dtype_or(Run& run, const char* key, DType dtype) {
  return run.settings.count(key) ? parse_dtype(run.get(key)) : dtype;
}

void softmax_forward(Run& run) {
  const DType dtype = parse_dtype(run.get("dtype"));
  const int64_t rows = run.num("rows"), cols = run.num("cols");
  size_t bytes = 0;
  void* workspace = softmax_workspace(run, dtype, rows, cols, &bytes);
  check(fastdl::kernels::softmax_forward(dtype, dtype_or(run, "out_dtype", dtype), run.ptr("x"), run.ptr("y"), rows,
                                         cols, run.num("x_stride"), run.flag("log"), workspace, bytes, nullptr),
        "softmax_forward");
  check(cudaGetLastError(), "softmax_forward (launch)");
}

void softmax_backward(Run& run) {
  const DType dtype = parse_dtype(run.get("dtype"));
  const DType dx_dtype = dtype_or(run, "dx_dtype", dtype);
  const int64_t rows = run.num("rows"), cols = run.num("cols");
  size_t bytes = 0;
  void* workspace = softmax_workspace(run, dx_dtype, rows, cols, &bytes);
  check(fastdl::kernels::softmax_backward(dtype, dx_dtype, run.ptr("dy"), run.ptr("y"), run.ptr("dx"), rows, cols,
                                          run.num("dy_stride"), run.num("y_stride"), run.flag("log"), workspace,
                                          bytes, nullptr),
        "softmax_backward");
  check(cudaGetLastError(), "softmax_backward (launch)");
}

// weight / bias (and dweight / dbias) in --set param_dtype=..., by default the accumulation type
DType param_dtype(Run& run, DType dtype) {
  if (run.settings.count("param_dtype")) return parse_dtype(run.get("param_dtype"));
  return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

void norm_forward(Run& run) {
  const DType dtype = parse_dtype(run.get("dtype"));
  check(fastdl::kernels::norm_forward(dtype, param_dtype(run, dtype), dtype_or(run, "out_dtype", dtype),
                                      dtype_or(run, "residual_dtype", dtype), run.ptr("x"), run.ptr("residual"),
                                      run.ptr("weight"), run.ptr("bias"), run.ptr("y"), run.ptr("sum"),
                                      run.ptr("mean"), run.ptr("rstd"),
                                      run.num("rows"), run.num("cols"), run.num("x_stride"),
                                      run.num("residual_stride", 0), std::strtod(run.get("eps").c_str(), nullptr),
                                      run.flag("rms"), nullptr),
        "norm_forward");
  check(cudaGetLastError(), "norm_forward (launch)");
}

void norm_backward(Run& run) {
  const DType dtype = parse_dtype(run.get("dtype"));
  const int64_t rows = run.num("rows"), cols = run.num("cols");
  const size_t acc = dtype == DType::kFloat64 ? 8 : 4;
  // dx_narrow_dtype: dx also written rounded to it (dx_narrow), beside fp32 rows
  const DType narrow = dtype_or(run, "dx_narrow_dtype", dtype);
  int64_t partial_rows = 0;
  check(fastdl::kernels::norm_backward_partial_rows(dtype, narrow, rows, cols, &partial_rows),
        "norm_backward_partial_rows");
  std::printf("partial_rows %lld\n", static_cast<long long>(partial_rows));
  std::printf("occupancy_queries %d\n", fastdl_emu::occupancy_queries());
  void* dweight_partial = run.ptr("dweight") ? run.make("dweight_partial", partial_rows * cols * acc, 0).data : nullptr;
  void* dbias_partial = run.ptr("dbias") ? run.make("dbias_partial", partial_rows * cols * acc, 0).data : nullptr;
  check(fastdl::kernels::norm_backward(dtype, param_dtype(run, dtype), dtype_or(run, "dy_dtype", dtype), narrow,
                                       run.ptr("dy"), run.ptr("dsum"),
                                       run.ptr("x"), run.ptr("weight"), run.ptr("mean"), run.ptr("rstd"),
                                       run.ptr("dx"), run.ptr("dx_narrow"), dweight_partial, dbias_partial, partial_rows,
                                       run.ptr("dweight"), run.ptr("dbias"), rows, cols,
                                       run.num("dy_stride"), run.num("dsum_stride", 0), run.num("x_stride"),
                                       run.flag("rms"), nullptr),
        "norm_backward");
  check(cudaGetLastError(), "norm_backward (launch)");
  // asked again after a launch (which may have opted a kernel in to more shared memory): a
  // second call must size its partial rows, and so sum dweight / dbias, as the first did
  check(fastdl::kernels::norm_backward_partial_rows(dtype, narrow, rows, cols, &partial_rows),
        "norm_backward_partial_rows");
  std::printf("partial_rows_after %lld\n", static_cast<long long>(partial_rows));
  std::printf("occupancy_queries_after %d\n", fastdl_emu::occupancy_queries());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage("usage: runner OP --buf NAME:DTYPE:COUNT[:OFFSET] --in NAME=FILE --out NAME=FILE --set K=V");
  const std::string op = argv[1];
  Run run;
  std::vector<std::pair<std::string, std::string>> outputs;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string kind = argv[i], value = argv[i + 1];
    if (kind == "--buf") {
      const auto parts = split(value, ':');
      if (parts.size() < 3) usage("bad --buf " + value);
      const size_t elem = dtype_bytes(parse_dtype(parts[1]));
      const size_t count = std::strtoull(parts[2].c_str(), nullptr, 10);
      const size_t offset = parts.size() > 3 ? std::strtoull(parts[3].c_str(), nullptr, 10) : 0;
      run.make(parts[0], count * elem, offset * elem);
    } else if (kind == "--in" || kind == "--out" || kind == "--set") {
      const size_t eq = value.find('=');
      if (eq == std::string::npos) usage("bad " + kind + " " + value);
      const std::string name = value.substr(0, eq), rest = value.substr(eq + 1);
      if (kind == "--set") {
        run.settings[name] = rest;
        continue;
      }
      if (!run.buffers.count(name)) usage(kind + " names no --buf: " + name);
      if (kind == "--out") {
        outputs.emplace_back(name, rest);
        continue;
      }
      Buffer& b = run.buffers[name];
      b.input = read_file(rest);
      if (b.input.size() != b.bytes) usage("file size differs from buffer " + name);
      std::memcpy(b.data, b.input.data(), b.bytes);
      b.is_input = true;
    } else {
      usage("unknown argument " + kind);
    }
  }
  if (op == "softmax_forward") softmax_forward(run);
  else if (op == "softmax_backward") softmax_backward(run);
  else if (op == "norm_forward") norm_forward(run);
  else if (op == "norm_backward") norm_backward(run);
  else if (op == "self_check")
    check(emulator_self_check(run.num("case"), static_cast<float*>(run.ptr("out"))), "self_check");
  else usage("unknown op " + op);

  for (const std::string& line : fastdl_emu::launches()) std::printf("launch %s\n", line.c_str());
  for (auto& [name, b] : run.buffers)
    if (b.is_input && std::memcmp(b.data, b.input.data(), b.bytes) != 0) {
      std::fprintf(stderr, "input %s was modified\n", name.c_str());
      return 5;
    }
  for (const auto& [name, path] : outputs) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    const Buffer& b = run.buffers[name];
    if (f == nullptr || std::fwrite(b.data, 1, b.bytes, f) != b.bytes) usage("cannot write " + path);
    std::fclose(f);
  }
  return 0;
}
