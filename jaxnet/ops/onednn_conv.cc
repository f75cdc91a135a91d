// oneDNN's convolutions as XLA FFI handlers, for jaxnet's conv impl "onednn": the forward pass, the input
// gradient and the weight gradient. jaxnet/ops/onednn.py compiles this file on first use and registers the
// handlers for the CPU platform.
//
// Layouts are XLA's defaults for jaxnet's convs: activations NHWC, kernels HWIO (one group, no dilation).
// Activations and kernels are float32 or bfloat16 (oneDNN runs bfloat16 on AMX or AVX-512 BF16 where the CPU
// has them); the weight gradient is float32 either way. The attributes sh, sw are the strides, pt, pb, pl, pr
// the explicit paddings.
//
// The handlers are asynchronous. Each splits the batch into one chunk per thread of XLA's intra-op thread
// pool, runs every chunk as a task of that pool with oneDNN single-threaded, and returns a future that is
// ready once all chunks are. A synchronous handler that let oneDNN's OpenMP threads run the whole batch was no
// faster than XLA's own conv in a FastNet step (its threads and XLA's compete for the same cores, and XLA
// waits on it); this one is (benchmarks/RESULTS.md, "oneDNN convolutions through XLA's FFI"). The weight
// gradient writes one partial sum per chunk (its result's leading axis); the caller adds them.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

enum Kind : int64_t { kForward, kInputGrad, kWeightGrad };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A conv's geometry: kind, data type (a memory::data_type), n h w c o kh kw sh sw pt pb pl pr (n: a chunk's batch).
using Geometry = std::array<int64_t, 15>;

// The primitive of one geometry and the descriptors of its kernel argument (the weights, or for the weight
// gradient the diff weights) and scratchpad. The scratchpad is the caller's, so that chunks may run one primitive
// at once.
struct Primitive {
  memory::dims weights;
  memory::desc kernel_desc, scratch_desc;
  dnnl::primitive primitive;
};

std::unique_ptr<Primitive> Create(const Geometry& g) {
  auto [kind, type, n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr] = g;
  auto dt = static_cast<memory::data_type>(type);
  int64_t oh = (h + pt + pb - kh) / sh + 1, ow = (w + pl + pr - kw) / sw + 1;
  memory::desc src({n, c, h, w}, dt, Tag::nhwc), dst({n, o, oh, ow}, dt, Tag::nhwc);
  memory::desc weights_any({o, c, kh, kw}, dt, Tag::any);  // oneDNN picks its blocked layout
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto forward = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, weights_any, dst,
      strides, pad_l, pad_r, attr);
  auto p = std::make_unique<Primitive>();
  p->weights = {o, c, kh, kw};
  if (kind == kForward) {
    p->kernel_desc = forward.weights_desc();
    p->scratch_desc = forward.scratchpad_desc();
    p->primitive = dnnl::convolution_forward(forward);
  } else if (kind == kInputGrad) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, src, weights_any, dst, strides, pad_l, pad_r, forward, attr);
    p->kernel_desc = pd.weights_desc();
    p->scratch_desc = pd.scratchpad_desc();
    p->primitive = dnnl::convolution_backward_data(pd);
  } else {
    memory::desc diff_weights_any({o, c, kh, kw}, kF32, Tag::any);
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, src, diff_weights_any, dst, strides, pad_l, pad_r, forward,
        attr);
    p->kernel_desc = pd.diff_weights_desc();
    p->scratch_desc = pd.scratchpad_desc();
    p->primitive = dnnl::convolution_backward_weights(pd);
  }
  return p;
}

// The primitive of `g`, created on first use and kept for the life of the process.
const Primitive& Lookup(const Geometry& g) {
  static std::mutex mu;
  static std::map<Geometry, std::unique_ptr<Primitive>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[g];
  if (!slot) slot = Create(g);
  return *slot;
}

// A buffer of `size` bytes for oneDNN, page-aligned: its AMX and AVX-512 kernels load whole cache lines, and
// `new char[]` aligns to 16 bytes only (under glibc the bf16 FastNet step ran 16 % slower on AMX for that,
// benchmarks/RESULTS.md, "Alignment of the oneDNN handler's buffers").
using Buffer = std::unique_ptr<char, decltype(&std::free)>;

Buffer Aligned(size_t size) {
  constexpr size_t kPage = 4096;
  char* data = static_cast<char*>(std::aligned_alloc(kPage, std::max<size_t>((size + kPage - 1) / kPage, 1) * kPage));
  if (data == nullptr) throw std::bad_alloc();
  return Buffer(data, &std::free);
}

// One chunk of a call: images [lo, lo + g[2]) of the batch. `a` and `b` are the whole-batch operands (forward:
// x, the HWIO kernel; input gradient: dy, the kernel; weight gradient: x, dy), `out` this chunk's result (the
// whole-batch y or dx, or this chunk's slot of HWIO float32 partial sums), `a_image`, `b_image`, `out_image` the
// bytes per image of each (0 for the kernels and the partial sums).
void RunChunk(const Geometry& g, int64_t lo, char* a, char* b, char* out, int64_t a_image, int64_t b_image,
              int64_t out_image) {
  const Primitive& p = Lookup(g);
  auto dt = static_cast<memory::data_type>(g[1]);
  int64_t n = g[2], c = g[5], o = g[6], h = g[3], w = g[4], kh = g[7], kw = g[8];
  int64_t oh = (h + g[11] + g[12] - kh) / g[9] + 1, ow = (w + g[13] + g[14] - kw) / g[10] + 1;
  memory::desc x_desc({n, c, h, w}, dt, Tag::nhwc), y_desc({n, o, oh, ow}, dt, Tag::nhwc);
  dnnl::stream stream(Engine());
  Buffer blocked_data(nullptr, &std::free), scratch_data = Aligned(p.scratch_desc.get_size());
  memory scratch(p.scratch_desc, Engine(), scratch_data.get());
  if (g[0] == kWeightGrad) {
    memory plain({p.weights, kF32, Tag::hwio}, Engine(), out);
    memory diff_weights = plain;
    if (p.kernel_desc != plain.get_desc()) {
      blocked_data = Aligned(p.kernel_desc.get_size());
      diff_weights = memory(p.kernel_desc, Engine(), blocked_data.get());
    }
    memory x(x_desc, Engine(), a + lo * a_image), dy(y_desc, Engine(), b + lo * b_image);
    p.primitive.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
    if (diff_weights != plain) dnnl::reorder(diff_weights, plain).execute(stream, diff_weights, plain);
    stream.wait();
    return;
  }
  memory plain({p.weights, dt, Tag::hwio}, Engine(), b);
  memory weights = plain;
  if (p.kernel_desc != plain.get_desc()) {
    blocked_data = Aligned(p.kernel_desc.get_size());
    weights = memory(p.kernel_desc, Engine(), blocked_data.get());
    dnnl::reorder(plain, weights).execute(stream, plain, weights);
  }
  if (g[0] == kForward) {
    memory x(x_desc, Engine(), a + lo * a_image), y(y_desc, Engine(), out + lo * out_image);
    p.primitive.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, y},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    memory dy(y_desc, Engine(), a + lo * a_image), dx(x_desc, Engine(), out + lo * out_image);
    p.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, dx},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  stream.wait();
}

ffi::Future Done(ffi::Error status) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (status.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(status);
  }
  return future;
}

ffi::Error Failure(const std::string& what) { return ffi::Error::Internal("oneDNN convolution: " + what); }

memory::data_type DataType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return memory::data_type::f32;
    case ffi::DataType::BF16:
      return memory::data_type::bf16;
    default:
      return memory::data_type::undef;
  }
}

// One call over the batch of x (dims `x_dims`, w's dims `w_dims`) in chunks: `chunks` tasks at most (for the
// weight gradient, the result's partial sums; the slots of chunks not needed are zeroed).
ffi::Future Run(ffi::ThreadPool pool, Kind kind, ffi::DataType type, char* a, char* b, char* out,
                ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims, int64_t a_image, int64_t b_image,
                int64_t out_image, int64_t chunks, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                int64_t pr) {
  memory::data_type dt = DataType(type);
  if (dt == memory::data_type::undef) return Done(Failure("float32 or bfloat16 operands only"));
  int64_t n = x_dims[0], per = std::max<int64_t>((n + chunks - 1) / chunks, 1), used = (n + per - 1) / per;
  int64_t slot = kind == kWeightGrad ? w_dims[0] * w_dims[1] * w_dims[2] * w_dims[3] * sizeof(float) : 0;
  if (slot) std::memset(out + used * slot, 0, (chunks - used) * slot);
  if (n == 0) return Done(ffi::Error::Success());
  Geometry whole = {kind, static_cast<int64_t>(dt), per, x_dims[1], x_dims[2], x_dims[3], w_dims[3], w_dims[0],
                    w_dims[1], sh, sw, pt, pb, pl, pr};
  Geometry last = whole;
  last[2] = n - (used - 1) * per;
  try {  // create the primitives here, so that an unsupported conv fails the call rather than a task
    Lookup(whole);
    Lookup(last);
  } catch (const std::exception& e) {
    return Done(Failure(e.what()));
  }
  ffi::CountDownPromise done(used);
  ffi::Future future(done);
  for (int64_t i = 0; i < used; ++i) {
    pool.Schedule([=]() mutable {
      omp_set_num_threads(1);  // this pool thread's OpenMP setting: the pool supplies the parallelism
      ffi::Error status = ffi::Error::Success();
      try {
        RunChunk(i + 1 == used ? last : whole, i * per, a, b, out + i * slot, a_image, b_image, out_image);
      } catch (const std::exception& e) {
        status = Failure(e.what());
      }
      done.CountDown(1, status);
    });
  }
  return future;
}

// One chunk per thread of XLA's pool, at most one per image.
int64_t Chunks(ffi::ThreadPool& pool, int64_t n) {
  return std::clamp<int64_t>(pool.num_threads(), 1, std::max<int64_t>(n, 1));
}

char* Data(ffi::AnyBuffer buffer) { return static_cast<char*>(buffer.untyped_data()); }

int64_t PerImage(ffi::AnyBuffer buffer) {
  int64_t n = buffer.dimensions()[0];
  return n ? buffer.size_bytes() / n : 0;
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(pool, kForward, x.element_type(), Data(x), Data(w), Data(*y), x.dimensions(), w.dimensions(),
             PerImage(x), 0, PerImage(*y), Chunks(pool, x.dimensions()[0]), sh, sw, pt, pb, pl, pr);
}

ffi::Future InputGrad(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                      int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(pool, kInputGrad, dy.element_type(), Data(dy), Data(w), Data(*dx), dx->dimensions(), w.dimensions(),
             PerImage(dy), 0, PerImage(*dx), Chunks(pool, dy.dimensions()[0]), sh, sw, pt, pb, pl, pr);
}

// dw: (chunks, KH, KW, C, O) float32 partial sums, chunks chosen by the caller.
ffi::Future WeightGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto d = dw->dimensions();
  if (dw->element_type() != ffi::DataType::F32 || d.size() != 5 || d[0] < 1) {
    return Done(Failure("the weight gradient's result must be (chunks, KH, KW, C, O) float32"));
  }
  const int64_t w_dims[4] = {d[1], d[2], d[3], d[4]};
  return Run(pool, kWeightGrad, x.element_type(), Data(x), Data(dy), Data(*dw), x.dimensions(),
             ffi::Span<const int64_t>(w_dims, 4), PerImage(x), PerImage(dy), 0, d[0], sh, sw, pt, pb, pl, pr);
}

}  // namespace

#define JAXNET_CONV_BINDING                                                                                  \
  ffi::Ffi::Bind()                                                                                           \
      .Ctx<ffi::ThreadPool>()                                                                                \
      .Arg<ffi::AnyBuffer>()                                                                                 \
      .Arg<ffi::AnyBuffer>()                                                                                 \
      .Ret<ffi::AnyBuffer>()                                                                                 \
      .Attr<int64_t>("sh")                                                                                   \
      .Attr<int64_t>("sw")                                                                                   \
      .Attr<int64_t>("pt")                                                                                   \
      .Attr<int64_t>("pb")                                                                                   \
      .Attr<int64_t>("pl")                                                                                   \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetOnednnConvForward, Forward, JAXNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetOnednnConvInputGrad, InputGrad, JAXNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetOnednnConvWeightGrad, WeightGrad, JAXNET_CONV_BINDING);

// Whether oneDNN has a convolution for `type` (a memory::data_type) on this CPU: bfloat16 needs AVX-512 or AMX.
extern "C" int JaxnetOnednnSupports(int type) {
  try {
    Create({kForward, type, 1, 3, 3, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1});
    return 1;
  } catch (const std::exception&) {
    return 0;
  }
}
