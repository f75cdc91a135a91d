// oneDNN's forward and input-gradient convolutions as XLA FFI handlers, for jaxnet's conv impl "onednn".
// jaxnet/ops/onednn.py compiles this file on first use and registers the two handlers for the CPU platform.
//
// Layouts are XLA's defaults for jaxnet's convs: activations NHWC, kernels HWIO (float32, one group, no
// dilation). The attributes sh, sw are the strides, pt, pb, pl, pr the explicit paddings.
//
// The handlers are asynchronous. Each splits the batch into one chunk per thread of XLA's intra-op thread
// pool, runs every chunk as a task of that pool with oneDNN single-threaded, and returns a future that is
// ready once all chunks are. A synchronous handler that let oneDNN's OpenMP threads run the whole batch was no
// faster than XLA's own conv in a FastNet step (its threads and XLA's compete for the same cores, and XLA
// waits on it); this one is (benchmarks/RESULTS.md, "oneDNN convolutions through XLA's FFI").
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <exception>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A conv's geometry: n h w c o kh kw sh sw pt pb pl pr (n is a chunk's batch).
using Geometry = std::array<int64_t, 13>;

// The primitives of one geometry. The scratchpad is the caller's, so that chunks may run one primitive at once.
struct Primitives {
  memory::dims weights;
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_backward_data::primitive_desc input_grad_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data input_grad;
};

std::unique_ptr<Primitives> Create(const Geometry& g) {
  auto [n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr] = g;
  int64_t oh = (h + pt + pb - kh) / sh + 1, ow = (w + pl + pr - kw) / sw + 1;
  memory::desc src({n, c, h, w}, kF32, Tag::nhwc), dst({n, o, oh, ow}, kF32, Tag::nhwc);
  memory::desc weights_any({o, c, kh, kw}, kF32, Tag::any);  // oneDNN picks its blocked layout
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto p = std::make_unique<Primitives>();
  p->weights = {o, c, kh, kw};
  p->forward_pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, weights_any, dst,
      strides, pad_l, pad_r, attr);
  p->input_grad_pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, weights_any, dst, strides, pad_l, pad_r, p->forward_pd,
      attr);
  p->forward = dnnl::convolution_forward(p->forward_pd);
  p->input_grad = dnnl::convolution_backward_data(p->input_grad_pd);
  return p;
}

// The primitives of `g`, created on first use and kept for the life of the process.
const Primitives& Lookup(const Geometry& g) {
  static std::mutex mu;
  static std::map<Geometry, std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[g];
  if (!slot) slot = Create(g);
  return *slot;
}

// Runs images [lo, lo + g[0]) of the batch. `in` and `out` are whole-batch buffers, `image_in` and `image_out`
// the floats per image of each.
void RunChunk(bool forward, const Geometry& g, int64_t lo, float* in, float* hwio, float* out, int64_t image_in,
              int64_t image_out) {
  const Primitives& p = Lookup(g);
  const memory::desc& weights_desc = forward ? p.forward_pd.weights_desc() : p.input_grad_pd.weights_desc();
  const memory::desc& scratch_desc = forward ? p.forward_pd.scratchpad_desc() : p.input_grad_pd.scratchpad_desc();
  dnnl::stream stream(Engine());
  memory plain({p.weights, kF32, Tag::hwio}, Engine(), hwio);
  std::unique_ptr<char[]> blocked_data, scratch_data(new char[scratch_desc.get_size()]);
  memory weights = plain;
  if (weights_desc != plain.get_desc()) {
    blocked_data.reset(new char[weights_desc.get_size()]);
    weights = memory(weights_desc, Engine(), blocked_data.get());
    dnnl::reorder(plain, weights).execute(stream, plain, weights);
  }
  memory scratch(scratch_desc, Engine(), scratch_data.get());
  if (forward) {
    memory x(p.forward_pd.src_desc(), Engine(), in + lo * image_in);
    memory y(p.forward_pd.dst_desc(), Engine(), out + lo * image_out);
    p.forward.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, y},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    memory dy(p.input_grad_pd.diff_dst_desc(), Engine(), in + lo * image_in);
    memory dx(p.input_grad_pd.diff_src_desc(), Engine(), out + lo * image_out);
    p.input_grad.execute(stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, dx},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  stream.wait();
}

ffi::Future Failed(const std::string& what) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(ffi::Error::Internal("oneDNN convolution: " + what));
  return future;
}

// The conv of `in` (x for the forward pass, the output gradient for the input gradient) with `hwio` into `out`.
// `x_dims` are the dims of the conv's input x (`in` of the forward pass, `out` of the input gradient).
ffi::Future Run(ffi::ThreadPool pool, bool forward, float* in, float* hwio, float* out,
                ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims, int64_t in_size, int64_t out_size,
                int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  int64_t n = x_dims[0];
  if (n == 0) {
    ffi::Promise promise;
    promise.SetAvailable();
    return ffi::Future(promise);
  }
  int64_t chunks = std::clamp<int64_t>(pool.num_threads(), 1, n), per = (n + chunks - 1) / chunks;
  chunks = (n + per - 1) / per;
  Geometry whole = {per, x_dims[1], x_dims[2], x_dims[3], w_dims[3], w_dims[0], w_dims[1], sh, sw, pt, pb, pl, pr};
  Geometry last = whole;
  last[0] = n - (chunks - 1) * per;
  try {  // create the primitives here, so that an unsupported conv fails the call rather than a task
    Lookup(whole);
    Lookup(last);
  } catch (const std::exception& e) {
    return Failed(e.what());
  }
  ffi::CountDownPromise done(chunks);
  ffi::Future future(done);
  for (int64_t i = 0; i < chunks; ++i) {
    pool.Schedule([=]() mutable {
      omp_set_num_threads(1);  // this pool thread's OpenMP setting: the pool supplies the parallelism
      ffi::Error status = ffi::Error::Success();
      try {
        RunChunk(forward, i + 1 == chunks ? last : whole, i * per, in, hwio, out, in_size / n, out_size / n);
      } catch (const std::exception& e) {
        status = ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
      }
      done.CountDown(1, status);
    });
  }
  return future;
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                    int64_t pr) {
  return Run(pool, true, x.typed_data(), w.typed_data(), y->typed_data(), x.dimensions(), w.dimensions(),
             x.element_count(), y->element_count(), sh, sw, pt, pb, pl, pr);
}

ffi::Future InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr) {
  return Run(pool, false, dy.typed_data(), w.typed_data(), dx->typed_data(), dx->dimensions(), w.dimensions(),
             dy.element_count(), dx->element_count(), sh, sw, pt, pb, pl, pr);
}

}  // namespace

#define JAXNET_CONV_BINDING                                                                                  \
  ffi::Ffi::Bind()                                                                                           \
      .Ctx<ffi::ThreadPool>()                                                                                \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                          \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                          \
      .Attr<int64_t>("sh")                                                                                   \
      .Attr<int64_t>("sw")                                                                                   \
      .Attr<int64_t>("pt")                                                                                   \
      .Attr<int64_t>("pb")                                                                                   \
      .Attr<int64_t>("pl")                                                                                   \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetOnednnConvForward, Forward, JAXNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetOnednnConvInputGrad, InputGrad, JAXNET_CONV_BINDING);
