// SPDX-License-Identifier: Apache-2.0
// tessera._C: the extension module behind the Python package. A thin layer: every function here
// takes arrays the Python side has already allocated (outputs included), turns each one into a
// TensorView without copying, fills the public params struct and calls the public C++ entry
// point with the GIL released. Argument checking is the library's own (its Status message
// becomes a ValueError); this file checks only what the library cannot see: the kind of object,
// its device, and dtypes and ranks a TensorView cannot hold.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "tessera/tessera.h"

namespace nb = nanobind;

namespace tessera::python {
namespace {

// The library's Status as a Python exception: a caller error (or an unsupported request) is a
// ValueError carrying the library's message; anything else a RuntimeError.
void Check(const Status& status) {
  if (status.ok()) return;
  if (status.code() == StatusCode::kInvalidArgument ||
      status.code() == StatusCode::kUnimplemented) {
    throw nb::value_error(status.ToString().c_str());
  }
  throw std::runtime_error(status.ToString());
}

// Runs a library call with the GIL released (other Python threads run meanwhile), then raises
// its Status. The call reads only the views built beforehand, never Python objects.
template <typename Call>
void RunWithoutGil(Call&& call) {
  Status status;
  {
    nb::gil_scoped_release release;
    status = call();
  }
  Check(status);
}

[[noreturn]] void TypeError(const std::string& message) {
  PyErr_SetString(PyExc_TypeError, message.c_str());
  throw nb::python_error();
}

[[noreturn]] void ValueError(const std::string& message) { throw nb::value_error(message.c_str()); }

// torch is never imported here: the Python side registers torch.Tensor and its dtypes once torch
// is importable (tessera._torch), and tensors of that type are read through their attributes,
// which costs far less than a DLPack export for the small calls where the overhead shows.
struct TorchTypes {
  nb::object tensor_type;
  std::vector<std::pair<nb::object, DType>> dtypes;
};
// torch's Tensor type and dtypes, looked up in sys.modules (never imported) until torch is
// there; the lookup happens here, at the first call with real arrays, so that the Python
// wrappers stay traceable by torch.compile.
const TorchTypes& Torch() {
  static TorchTypes* types = new TorchTypes();  // never destroyed: outlives interpreter teardown
  if (!types->tensor_type.is_valid()) {
    nb::dict modules = nb::borrow<nb::dict>(nb::module_::import_("sys").attr("modules"));
    if (modules.contains("torch")) {
      nb::object torch = modules["torch"];
      types->dtypes = {{torch.attr("float32"), DType::kF32}, {torch.attr("bfloat16"), DType::kBF16},
                       {torch.attr("float16"), DType::kF16}, {torch.attr("uint8"), DType::kU8},
                       {torch.attr("bool"), DType::kBool},   {torch.attr("int32"), DType::kI32}};
      types->tensor_type = torch.attr("Tensor");
    }
  }
  return *types;
}

std::string PyTypeName(nb::handle obj) {
  return nb::borrow<nb::str>(nb::handle(obj.type()).attr("__name__")).c_str();
}

// Attribute names looked up on every torch tensor, interned once.
struct TorchNames {
  nb::str is_cpu{"is_cpu"}, device{"device"}, dtype{"dtype"}, shape{"shape"}, stride{"stride"},
      data_ptr{"data_ptr"};
};
const TorchNames& Names() {
  static TorchNames* names = new TorchNames();
  return *names;
}

TensorView FromTorch(nb::handle t, const char* name) {
  const TorchNames& n = Names();
  TensorView view;
  if (!nb::cast<bool>(t.attr(n.is_cpu))) {
    // An lvalue: nb::str of an attribute accessor would reinterpret the torch.device as a str
    // (no conversion) and c_str() would return null.
    const nb::object device = t.attr(n.device);
    ValueError(std::string(name) + ": expected a CPU tensor, got one on " +
               nb::str(device).c_str());
  }
  nb::object dtype = t.attr(n.dtype);
  bool known = false;
  for (const auto& [object, dt] : Torch().dtypes) {
    if (dtype.is(object)) {
      view.dtype = dt;
      known = true;
      break;
    }
  }
  if (!known) {
    ValueError(std::string(name) + ": expected dtype float32, bfloat16 or float16 (masks: bool, " +
               "uint8, int32), got " + nb::str(dtype).c_str());
  }
  nb::object shape = t.attr(n.shape);
  nb::object strides = t.attr(n.stride)();
  if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr())) {  // torch.Size: a tuple
    TypeError(std::string(name) + ": expected a tensor whose shape and stride() are tuples");
  }
  const Py_ssize_t rank = PyTuple_GET_SIZE(shape.ptr());
  if (rank > 4 || PyTuple_GET_SIZE(strides.ptr()) != rank) {
    ValueError(std::string(name) + ": expected at most 4 dimensions, got " + std::to_string(rank));
  }
  view.rank = static_cast<int32_t>(rank);
  for (Py_ssize_t i = 0; i < rank; ++i) {
    view.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), i));
    view.strides[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), i));
    if (view.strides[i] < 0) {
      ValueError(std::string(name) + ": expected non-negative strides, got " +
                 std::to_string(view.strides[i]) + " in dim " + std::to_string(i));
    }
  }
  view.data = PyLong_AsVoidPtr(t.attr(n.data_ptr)().ptr());
  return view;
}

// numpy's name of a DLPack dtype ("float64", "int64", ...), for error messages.
std::string DLPackTypeName(nb::dlpack::dtype dtype) {
  using Code = nb::dlpack::dtype_code;
  std::string base;
  switch (static_cast<Code>(dtype.code)) {
    case Code::Int:
      base = "int";
      break;
    case Code::UInt:
      base = "uint";
      break;
    case Code::Float:
      base = "float";
      break;
    case Code::Bfloat:
      base = "bfloat";
      break;
    case Code::Complex:
      base = "complex";
      break;
    case Code::Bool:
      return "bool";
    default:
      return "a DLPack type of code " + std::to_string(dtype.code) + " and " +
             std::to_string(dtype.bits) + " bits";
  }
  std::string name = base + std::to_string(dtype.bits);
  if (dtype.lanes != 1) name += " x " + std::to_string(dtype.lanes) + " lanes";
  return name;
}

DType FromDLPack(nb::dlpack::dtype dtype, const char* name) {
  using Code = nb::dlpack::dtype_code;
  const auto code = static_cast<Code>(dtype.code);
  if (dtype.lanes == 1) {
    if (code == Code::Float && dtype.bits == 32) return DType::kF32;
    if (code == Code::Float && dtype.bits == 16) return DType::kF16;
    if (code == Code::Bfloat && dtype.bits == 16) return DType::kBF16;
    if (code == Code::UInt && dtype.bits == 8) return DType::kU8;
    if (code == Code::Bool && dtype.bits == 8) return DType::kBool;
    if (code == Code::Int && dtype.bits == 32) return DType::kI32;
  }
  ValueError(std::string(name) +
             ": expected dtype float32, bfloat16 or float16 (masks: bool, uint8, int32), got " +
             DLPackTypeName(dtype));
}

using AnyArray = nb::ndarray<nb::ro>;

// A TensorView over `obj` (a torch CPU tensor, or anything with the buffer protocol or DLPack:
// numpy arrays), in place, with its strides. None gives an empty view (data == nullptr).
TensorView ToView(nb::handle obj, const char* name) {
  if (obj.is_none()) return TensorView{};
  const TorchTypes& torch = Torch();
  if (torch.tensor_type.is_valid() &&
      PyObject_IsInstance(obj.ptr(), torch.tensor_type.ptr()) == 1) {
    return FromTorch(obj, name);
  }
  AnyArray array;
  if (!nb::try_cast<AnyArray>(obj, array, /*convert=*/false)) {
    TypeError(std::string(name) + ": expected a numpy array or a torch tensor, got " +
              PyTypeName(obj));
  }
  if (array.device_type() != nb::device::cpu::value) {
    ValueError(std::string(name) + ": expected an array in CPU memory");
  }
  TensorView view;
  view.dtype = FromDLPack(array.dtype(), name);
  const size_t rank = array.ndim();
  if (rank > 4) {
    ValueError(std::string(name) + ": expected at most 4 dimensions, got " + std::to_string(rank));
  }
  view.rank = static_cast<int32_t>(rank);
  for (size_t i = 0; i < rank; ++i) {
    view.shape[i] = static_cast<int64_t>(array.shape(i));
    view.strides[i] = array.stride(i);
    if (view.strides[i] < 0) {
      ValueError(std::string(name) + ": expected non-negative strides, got " +
                 std::to_string(view.strides[i]) + " in dim " + std::to_string(i));
    }
  }
  view.data = const_cast<void*>(static_cast<const void*>(array.data()));
  return view;
}

Context MakeContext(int32_t threads, int32_t path) {
  Context ctx;
  ctx.num_threads = threads;
  ctx.path = static_cast<Path>(path);
  return ctx;
}

std::optional<float> OptionalScale(std::optional<double> scale) {
  if (!scale) return std::nullopt;
  return static_cast<float>(*scale);
}

// The Python Mask's fields, read by name (only when a mask is given).
void FillMask(nb::handle mask, nb::handle dense, MaskParams* out) {
  out->dense = ToView(dense, "attn_mask");
  if (mask.is_none()) return;
  out->blocks = ToView(mask.attr("blocks"), "mask.blocks");
  out->block_q = nb::cast<int64_t>(mask.attr("block_q"));
  out->block_k = nb::cast<int64_t>(mask.attr("block_k"));
  nb::object nbhd = mask.attr("neighborhood");
  if (!nbhd.is_none()) {
    nb::tuple axes = nb::borrow<nb::tuple>(nbhd);
    const size_t rank = nb::len(axes);
    if (rank < 1 || rank > 3) ValueError("mask: a neighborhood has 1 to 3 axes");
    out->neighborhood.rank = static_cast<int32_t>(rank);
    for (size_t a = 0; a < rank; ++a) {
      nb::tuple axis =
          nb::borrow<nb::tuple>(axes[a]);  // (length, window, dilation, stride, causal)
      out->neighborhood.grid[a] = nb::cast<int64_t>(axis[0]);
      out->neighborhood.window[a] = nb::cast<int64_t>(axis[1]);
      out->neighborhood.dilation[a] = nb::cast<int64_t>(axis[2]);
      out->neighborhood.stride[a] = nb::cast<int64_t>(axis[3]);
      out->neighborhood.causal[a] = nb::cast<bool>(axis[4]);
    }
  }
  out->sink_tokens = nb::cast<int64_t>(mask.attr("sink_tokens"));
  out->prefix_len = nb::cast<int64_t>(mask.attr("prefix_len"));
  out->document_ids = ToView(mask.attr("document_ids"), "mask.document_ids");
  out->group_size = nb::cast<int64_t>(mask.attr("group_size"));
  out->shift_half_heads = nb::cast<bool>(mask.attr("shift_half_heads"));
  out->tree_parents = ToView(mask.attr("tree_parents"), "mask.tree_parents");
  nb::object mask_dense = mask.attr("dense");
  if (!mask_dense.is_none()) {
    if (out->dense.data != nullptr) {
      ValueError("attn_mask: a dense mask is given twice (attn_mask and mask.dense)");
    }
    out->dense = ToView(mask_dense, "mask.dense");
  }
  out->score =
      nb::cast<bool>(mask.attr("sigmoid")) ? ScoreFunction::kSigmoid : ScoreFunction::kSoftmax;
  out->sigmoid_bias = nb::cast<float>(mask.attr("sigmoid_bias"));
}

// The options shared by the forward and the backward.
struct AttentionOptions {
  std::optional<double> scale;
  bool causal = false;
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool top_left = false;
  double softcap = 0.0;
  int32_t num_seqs = 0;
};

AttentionParams MakeAttentionParams(nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                                    nb::handle lse, const AttentionOptions& o,
                                    nb::handle alibi_slopes, nb::handle cu_seqlens_q,
                                    nb::handle cu_seqlens_k, nb::handle attn_mask,
                                    nb::handle mask) {
  AttentionParams p;
  p.q = ToView(q, "q");
  p.k = ToView(k, "k");
  p.v = ToView(v, "v");
  p.out = ToView(out, "out");
  p.lse = ToView(lse, "lse");
  p.scale = OptionalScale(o.scale);
  p.causal = o.causal;
  p.window_left = o.window_left;
  p.window_right = o.window_right;
  p.align = o.top_left ? MaskAlign::kTopLeft : MaskAlign::kBottomRight;
  p.softcap = static_cast<float>(o.softcap);
  p.alibi_slopes = ToView(alibi_slopes, "alibi_slopes");
  p.cu_seqlens_q = ToView(cu_seqlens_q, "cu_seqlens_q");
  p.cu_seqlens_k = ToView(cu_seqlens_k, "cu_seqlens_k");
  p.num_seqs = o.num_seqs;
  FillMask(mask, attn_mask, &p.mask);
  return p;
}

void AttentionForwardPy(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                        std::optional<double> scale, bool causal, int64_t window_left,
                        int64_t window_right, bool top_left, double softcap,
                        nb::handle alibi_slopes, nb::handle cu_seqlens_q, nb::handle cu_seqlens_k,
                        int32_t num_seqs, nb::handle attn_mask, nb::handle mask, int32_t threads,
                        int32_t path) {
  const AttentionOptions o{scale, causal, window_left, window_right, top_left, softcap, num_seqs};
  const AttentionParams p = MakeAttentionParams(q, k, v, out, lse, o, alibi_slopes, cu_seqlens_q,
                                                cu_seqlens_k, attn_mask, mask);
  const Context ctx = MakeContext(threads, path);
  RunWithoutGil([&] { return AttentionForward(p, ctx); });
}

// The forward with window statistics (AttentionStats): the same options, plus the statistics
// outputs.
void AttentionStatsPy(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                      nb::handle key_mass, nb::handle key_mass_sq, nb::handle row_entropy,
                      int64_t window, bool sum_gqa_group, std::optional<double> scale, bool causal,
                      int64_t window_left, int64_t window_right, bool top_left, double softcap,
                      nb::handle alibi_slopes, int32_t threads, int32_t path) {
  const AttentionOptions o{scale, causal, window_left, window_right, top_left, softcap, 0};
  AttentionParams p = MakeAttentionParams(q, k, v, out, lse, o, alibi_slopes, nb::none(),
                                          nb::none(), nb::none(), nb::none());
  p.stats.window = window;
  p.stats.sum_gqa_group = sum_gqa_group;
  p.stats.key_mass = ToView(key_mass, "key_mass");
  p.stats.key_mass_sq = ToView(key_mass_sq, "key_mass_sq");
  p.stats.row_entropy = ToView(row_entropy, "row_entropy");
  const Context ctx = MakeContext(threads, path);
  RunWithoutGil([&] { return AttentionForward(p, ctx); });
}

void AttentionBackwardPy(nb::handle dout, nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                         nb::handle lse, nb::handle dq, nb::handle dk, nb::handle dv,
                         std::optional<double> scale, bool causal, int64_t window_left,
                         int64_t window_right, bool top_left, double softcap,
                         nb::handle alibi_slopes, nb::handle cu_seqlens_q, nb::handle cu_seqlens_k,
                         int32_t num_seqs, nb::handle attn_mask, nb::handle mask, int32_t threads,
                         int32_t path) {
  const AttentionOptions o{scale, causal, window_left, window_right, top_left, softcap, num_seqs};
  AttentionBackwardParams p;
  p.forward = MakeAttentionParams(q, k, v, out, lse, o, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                                  attn_mask, mask);
  p.dout = ToView(dout, "dout");
  p.dq = ToView(dq, "dq");
  p.dk = ToView(dk, "dk");
  p.dv = ToView(dv, "dv");
  const Context ctx = MakeContext(threads, path);
  RunWithoutGil([&] { return AttentionBackward(p, ctx); });
}

void MergeStatesPy(nb::handle out_parts, nb::handle lse_parts, nb::handle out, nb::handle lse,
                   bool base2, int32_t threads) {
  MergeStatesParams p;
  p.out_parts = ToView(out_parts, "outs");
  p.lse_parts = ToView(lse_parts, "lses");
  p.out = ToView(out, "out");
  p.lse = ToView(lse, "lse");
  p.base2 = base2;
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return MergeStates(p, ctx); });
}

// ---- KV cache: one owning pool; the Python KVCache keeps seq_lens and the block table. --------

KVDType ParseKVDType(const std::string& name) {
  for (KVDType t : {KVDType::kF32, KVDType::kBF16, KVDType::kF16, KVDType::kInt8, KVDType::kInt4}) {
    if (name == KVDTypeName(t)) return t;
  }
  ValueError("dtype: expected one of f32, bf16, f16, int8, int4, got '" + name + "'");
}

class KVPool {
 public:
  KVPool(const std::string& dtype, int64_t num_pages, int64_t page_size, int64_t num_kv_heads,
         int64_t head_dim) {
    Check(cache_.Allocate(ParseKVDType(dtype), num_pages, page_size, num_kv_heads, head_dim));
  }
  int64_t bytes() const { return cache_.bytes(); }
  KVCacheView view() { return cache_.view(); }  // for save_kv_file and CompactPy

  void Append(nb::handle k_new, nb::handle v_new, nb::handle seq_lens, nb::handle block_table,
              int64_t rotary_dim, double rotary_base, bool interleaved, double xpos_scale_base,
              double xpos_gamma, int32_t threads) {
    AppendKVParams p;
    p.k_new = ToView(k_new, "k");
    p.v_new = ToView(v_new, "v");
    p.cache = cache_.view();
    p.batch = Batch(seq_lens, block_table);
    p.rotary.rotary_dim = rotary_dim;
    p.rotary.base = static_cast<float>(rotary_base);
    p.rotary.interleaved = interleaved;
    p.rotary.xpos_scale_base = static_cast<float>(xpos_scale_base);
    p.rotary.xpos_gamma = static_cast<float>(xpos_gamma);
    const Context ctx = MakeContext(threads, 0);
    RunWithoutGil([&] { return AppendKV(p, ctx); });
  }

  void Read(int64_t b, nb::handle seq_lens, nb::handle block_table, nb::handle k_out,
            nb::handle v_out, int32_t threads) {
    ReadKVParams p;
    p.cache = cache_.view();
    p.batch = Batch(seq_lens, block_table);
    p.b = b;
    p.k_out = ToView(k_out, "k_out");
    p.v_out = ToView(v_out, "v_out");
    const Context ctx = MakeContext(threads, 0);
    RunWithoutGil([&] { return ReadKV(p, ctx); });
  }

  void Decode(nb::handle q, nb::handle seq_lens, nb::handle block_table, nb::handle out,
              nb::handle lse, std::optional<double> scale, bool causal, int64_t window_left,
              double softcap, nb::handle alibi_slopes, int64_t split_tokens, nb::handle probs,
              nb::handle accumulated, int32_t threads, int32_t path) {
    DecodeParams p;
    p.stats.probs = ToView(probs, "probs");
    p.stats.accumulated = ToView(accumulated, "accumulated");
    p.q = ToView(q, "q");
    p.cache = cache_.view();
    p.kv = Batch(seq_lens, block_table);
    p.out = ToView(out, "out");
    p.lse = ToView(lse, "lse");
    p.scale = OptionalScale(scale);
    p.causal = causal;
    p.window_left = window_left;
    p.softcap = static_cast<float>(softcap);
    p.alibi_slopes = ToView(alibi_slopes, "alibi_slopes");
    p.split_tokens = split_tokens;
    const Context ctx = MakeContext(threads, path);
    RunWithoutGil([&] { return tessera::Decode(p, ctx); });
  }

 private:
  static KVBatchView Batch(nb::handle seq_lens, nb::handle block_table) {
    KVBatchView batch;
    batch.seq_lens = ToView(seq_lens, "seq_lens");
    batch.block_table = ToView(block_table, "block_table");
    batch.batch = batch.seq_lens.rank >= 1 ? batch.seq_lens.shape[0] : 0;
    return batch;
  }
  KVCache cache_;
};

void ApplyRotaryPy(nb::handle x, nb::handle positions, int64_t rotary_dim, double base,
                   bool interleaved, double xpos_scale_base, double xpos_gamma, bool keys,
                   int32_t threads) {
  ApplyRotaryParams p;
  p.x = ToView(x, "x");
  p.positions = ToView(positions, "positions");
  p.rotary.rotary_dim = rotary_dim;
  p.rotary.base = static_cast<float>(base);
  p.rotary.interleaved = interleaved;
  p.rotary.xpos_scale_base = static_cast<float>(xpos_scale_base);
  p.rotary.xpos_gamma = static_cast<float>(xpos_gamma);
  p.keys = keys;
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return ApplyRotary(p, ctx); });
}

// ---- Linear attention ------------------------------------------------------------------------

LinearFeatureMap ParseFeatureMap(const std::string& name) {
  if (name == "identity") return LinearFeatureMap::kIdentity;
  if (name == "elu1") return LinearFeatureMap::kElu1;
  if (name == "relu") return LinearFeatureMap::kRelu;
  if (name == "taylor2") return LinearFeatureMap::kTaylor2;
  ValueError("feature_map: expected one of identity, elu1, relu, taylor2, got '" + name + "'");
}

int64_t LinearFeatureDimPy(const std::string& feature_map, int64_t dk, bool lrpe) {
  return LinearFeatureDim(ParseFeatureMap(feature_map), dk, lrpe);
}

LinearAttentionParams MakeLinearParams(nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                                       const std::string& feature_map, std::optional<double> scale,
                                       bool causal, int64_t prefix_len, bool normalize, double eps,
                                       nb::handle decay, nb::handle gates, int64_t window,
                                       nb::handle initial_state, nb::handle initial_normalizer,
                                       nb::handle final_state, nb::handle final_normalizer,
                                       int64_t chunk_size, nb::handle lrpe_theta = nb::handle(),
                                       int64_t position_offset = 0) {
  LinearAttentionParams p;
  p.q = ToView(q, "q");
  p.k = ToView(k, "k");
  p.v = ToView(v, "v");
  p.out = ToView(out, "out");
  p.feature_map = ParseFeatureMap(feature_map);
  p.scale = OptionalScale(scale);
  p.causal = causal;
  p.prefix_len = prefix_len;
  p.normalize = normalize;
  p.eps = static_cast<float>(eps);
  p.decay = ToView(decay, "decay");
  p.gates = ToView(gates, "gates");
  p.window = window;
  p.initial_state = ToView(initial_state, "initial_state");
  p.initial_normalizer = ToView(initial_normalizer, "initial_normalizer");
  p.final_state = ToView(final_state, "final_state");
  p.final_normalizer = ToView(final_normalizer, "final_normalizer");
  p.chunk_size = chunk_size;
  // LRPE: off when lrpe_theta is None (LASP-2's callers leave both at their defaults).
  if (lrpe_theta.is_valid()) p.lrpe_theta = ToView(lrpe_theta, "lrpe_theta");
  p.position_offset = position_offset;
  return p;
}

void LinearForwardPy(bool recurrent, nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                     const std::string& feature_map, std::optional<double> scale, bool causal,
                     int64_t prefix_len, bool normalize, double eps, nb::handle decay,
                     nb::handle gates, int64_t window, nb::handle initial_state,
                     nb::handle initial_normalizer, nb::handle final_state,
                     nb::handle final_normalizer, int64_t chunk_size, nb::handle lrpe_theta,
                     int64_t position_offset, int32_t threads, int32_t path) {
  const LinearAttentionParams p =
      MakeLinearParams(q, k, v, out, feature_map, scale, causal, prefix_len, normalize, eps, decay,
                       gates, window, initial_state, initial_normalizer, final_state,
                       final_normalizer, chunk_size, lrpe_theta, position_offset);
  const Context ctx = MakeContext(threads, path);
  RunWithoutGil([&] {
    return recurrent ? LinearAttentionRecurrent(p, ctx) : LinearAttentionForward(p, ctx);
  });
}

void LinearBackwardPy(nb::handle dout, nb::handle q, nb::handle k, nb::handle v, nb::handle dq,
                      nb::handle dk, nb::handle dv, nb::handle dgates,
                      const std::string& feature_map, std::optional<double> scale, bool causal,
                      int64_t prefix_len, bool normalize, double eps, nb::handle decay,
                      nb::handle gates, int64_t chunk_size, nb::handle lrpe_theta,
                      int64_t position_offset, int32_t threads, int32_t path) {
  LinearAttentionBackwardParams p;
  p.forward = MakeLinearParams(q, k, v, nb::none(), feature_map, scale, causal, prefix_len,
                               normalize, eps, decay, gates, 0, nb::none(), nb::none(), nb::none(),
                               nb::none(), chunk_size, lrpe_theta, position_offset);
  p.dout = ToView(dout, "dout");
  p.dq = ToView(dq, "dq");
  p.dk = ToView(dk, "dk");
  p.dv = ToView(dv, "dv");
  p.dgates = ToView(dgates, "dgates");
  const Context ctx = MakeContext(threads, path);
  RunWithoutGil([&] { return LinearAttentionBackward(p, ctx); });
}

// ---- Sequence parallelism through a Python communicator ------------------------------------
// A Communicator whose operations call methods of a Python object (tessera/_dist_comm.py wraps
// a torch.distributed group or an mpi4py communicator in one): rank(), size(),
// start_exchange(send, dst, recv, src) -> handle, wait(handle), all_gather(send, recv), with the
// buffers passed as uint8 numpy arrays over the library's memory (no copies). The C++ drivers
// run with the GIL released; each callback takes it back for its call, on the caller's thread.
class PyCommunicator final : public Communicator {
 public:
  explicit PyCommunicator(nb::handle comm) : comm_(nb::borrow(comm)) {
    rank_ = nb::cast<int>(comm_.attr("rank")());
    size_ = nb::cast<int>(comm_.attr("size")());
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Status StartExchange(const void* send, int64_t send_bytes, int dst, void* recv,
                       int64_t recv_bytes, int src, int64_t* handle) override {
    nb::gil_scoped_acquire gil;
    return Guarded("start_exchange", [&] {
      nb::object h = comm_.attr("start_exchange")(Bytes(const_cast<void*>(send), send_bytes), dst,
                                                  Bytes(recv, recv_bytes), src);
      *handle = next_;
      handles_.emplace(next_++, std::move(h));
    });
  }
  Status WaitExchange(int64_t handle, double* transfer_seconds) override {
    nb::gil_scoped_acquire gil;
    auto it = handles_.find(handle);
    if (it == handles_.end()) return Status::Internal("wait: unknown exchange handle");
    nb::object h = std::move(it->second);
    handles_.erase(it);
    const auto start = std::chrono::steady_clock::now();
    Status st = Guarded("wait", [&] { comm_.attr("wait")(h); });
    // The transfer's own time is not visible from here: what the wait blocked is a lower bound.
    if (transfer_seconds != nullptr) {
      *transfer_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    return st;
  }
  Status AllGather(const void* send, int64_t bytes, void* recv) override {
    nb::gil_scoped_acquire gil;
    return Guarded("all_gather", [&] {
      comm_.attr("all_gather")(Bytes(const_cast<void*>(send), bytes), Bytes(recv, bytes * size_));
    });
  }

 private:
  static nb::object Bytes(void* data, int64_t n) {
    static uint8_t empty = 0;
    const size_t shape[1] = {static_cast<size_t>(n)};
    // rv_policy::reference: a view of the library's memory (nanobind copies an ownerless array
    // under the default policy, and the callee's writes would be lost).
    return nb::cast(
        nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(
            data != nullptr ? static_cast<uint8_t*>(data) : &empty, 1, shape, nb::handle()),
        nb::rv_policy::reference);
  }
  // A Python exception in the communicator becomes an error Status (the driver then returns it).
  template <typename F>
  static Status Guarded(const char* what, F&& f) {
    try {
      f();
      return Status::Ok();
    } catch (nb::python_error& e) {
      return Status::Internal(std::string("communicator ") + what + ": " + e.what());
    }
  }
  nb::object comm_;
  int rank_ = 0, size_ = 1;
  std::map<int64_t, nb::object> handles_;
  int64_t next_ = 0;
};

// Runs a driver with the GIL released, over a PyCommunicator (built with the GIL held).
template <typename Driver>
void RunDistributed(nb::handle comm, Driver&& driver) {
  PyCommunicator c(comm);
  RunWithoutGil([&] { return driver(c); });
}

void Lasp2ForwardPy(nb::handle comm, nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                    const std::string& feature_map, std::optional<double> scale, bool normalize,
                    double eps, nb::handle decay, nb::handle gates, int64_t chunk_size,
                    int32_t threads) {
  Lasp2Params p;
  p.local = MakeLinearParams(q, k, v, out, feature_map, scale, true, 0, normalize, eps, decay,
                             gates, 0, nb::none(), nb::none(), nb::none(), nb::none(), chunk_size);
  const Context ctx = MakeContext(threads, 0);
  RunDistributed(comm, [&](Communicator& c) { return Lasp2Forward(p, c, ctx); });
}

void Lasp2BackwardPy(nb::handle comm, nb::handle dout, nb::handle q, nb::handle k, nb::handle v,
                     nb::handle dq, nb::handle dk, nb::handle dv, nb::handle dgates,
                     const std::string& feature_map, std::optional<double> scale, bool normalize,
                     double eps, nb::handle decay, nb::handle gates, int64_t chunk_size,
                     int32_t threads) {
  Lasp2BackwardParams p;
  p.local.forward =
      MakeLinearParams(q, k, v, nb::none(), feature_map, scale, true, 0, normalize, eps, decay,
                       gates, 0, nb::none(), nb::none(), nb::none(), nb::none(), chunk_size);
  p.local.dout = ToView(dout, "dout");
  p.local.dq = ToView(dq, "dq");
  p.local.dk = ToView(dk, "dk");
  p.local.dv = ToView(dv, "dv");
  p.local.dgates = ToView(dgates, "dgates");
  const Context ctx = MakeContext(threads, 0);
  RunDistributed(comm, [&](Communicator& c) { return Lasp2Backward(p, c, ctx); });
}

ShardLayout ParseLayout(const std::string& name) {
  if (name == "contiguous") return ShardLayout::kContiguous;
  if (name == "zigzag") return ShardLayout::kZigzag;
  ValueError("layout: expected 'contiguous' or 'zigzag', got '" + name + "'");
}

// Ring attention or Ulysses (`algorithm` "ring" / "ulysses"), forward and backward.
using ForwardDriver = Status (*)(const SequenceParallelParams&, Communicator&, const Context&,
                                 DistributedTiming*);
using BackwardDriver = Status (*)(const SequenceParallelBackwardParams&, Communicator&,
                                  const Context&, DistributedTiming*);
bool IsRing(const std::string& algorithm) {
  if (algorithm == "ring") return true;
  if (algorithm == "ulysses") return false;
  ValueError("algorithm: expected 'ring' or 'ulysses', got '" + algorithm + "'");
}

void SequenceParallelForwardPy(nb::handle comm, const std::string& algorithm, nb::handle q,
                               nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                               bool causal, int64_t window_left, int64_t window_right,
                               std::optional<double> scale, double softcap,
                               const std::string& layout, int32_t threads) {
  const ForwardDriver driver = IsRing(algorithm) ? &RingAttentionForward : &UlyssesAttentionForward;
  SequenceParallelParams p;
  p.layout = ParseLayout(layout);
  p.local.q = ToView(q, "q");
  p.local.k = ToView(k, "k");
  p.local.v = ToView(v, "v");
  p.local.out = ToView(out, "out");
  p.local.lse = ToView(lse, "lse");
  p.local.causal = causal;
  p.local.window_left = window_left;
  p.local.window_right = window_right;
  p.local.scale = OptionalScale(scale);
  p.local.softcap = static_cast<float>(softcap);
  const Context ctx = MakeContext(threads, 0);
  RunDistributed(comm, [&](Communicator& c) { return driver(p, c, ctx, nullptr); });
}

void SequenceParallelBackwardPy(nb::handle comm, const std::string& algorithm, nb::handle dout,
                                nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                                nb::handle lse, nb::handle dq, nb::handle dk, nb::handle dv,
                                bool causal, int64_t window_left, int64_t window_right,
                                std::optional<double> scale, double softcap,
                                const std::string& layout, int32_t threads) {
  const BackwardDriver driver =
      IsRing(algorithm) ? &RingAttentionBackward : &UlyssesAttentionBackward;
  SequenceParallelBackwardParams p;
  p.layout = ParseLayout(layout);
  AttentionParams& f = p.local.forward;
  f.q = ToView(q, "q");
  f.k = ToView(k, "k");
  f.v = ToView(v, "v");
  f.out = ToView(out, "out");
  f.lse = ToView(lse, "lse");
  f.causal = causal;
  f.window_left = window_left;
  f.window_right = window_right;
  f.scale = OptionalScale(scale);
  f.softcap = static_cast<float>(softcap);
  p.local.dout = ToView(dout, "dout");
  p.local.dq = ToView(dq, "dq");
  p.local.dk = ToView(dk, "dk");
  p.local.dv = ToView(dv, "dv");
  const Context ctx = MakeContext(threads, 0);
  RunDistributed(comm, [&](Communicator& c) { return driver(p, c, ctx, nullptr); });
}

// A wrapper whose own checks failed before it could call a driver joins the driver's agreement
// with the error, so that the other ranks' call fails instead of waiting.
void JoinWithErrorPy(nb::handle comm, const std::string& message) {
  PyCommunicator c(comm);
  const Status error = Status::InvalidArgument(message);
  nb::gil_scoped_release release;
  (void)JoinWithError(c, error);
}

// ---- Approximate attention -------------------------------------------------------------------

// The method's options from a dict {field name: value} (the field names of its options struct in
// tessera/approx.h); a key the method does not have is a ValueError naming it.
void ApplyApproxOptions(ApproxParams* p, nb::dict options) {
  for (auto [key, value] : options) {
    const std::string name = nb::cast<std::string>(key);
    auto as_int = [&] { return nb::cast<int64_t>(value); };
    auto as_float = [&] { return static_cast<float>(nb::cast<double>(value)); };
    auto as_view = [&] { return ToView(value, name.c_str()); };
    bool known = true;
    switch (p->method) {
      case ApproxMethod::kWersa:
        if (name == "levels")
          p->wersa.levels = as_int();
        else if (name == "gates")
          p->wersa.gates = as_view();
        else if (name == "level_weights")
          p->wersa.level_weights = as_view();
        else if (name == "features")
          p->wersa.features = as_int();
        else if (name == "bandwidth")
          p->wersa.bandwidth = as_float();
        else if (name == "projection")
          p->wersa.projection = as_view();
        else
          known = false;
        break;
      case ApproxMethod::kPerformer:
        if (name == "features")
          p->performer.features = as_int();
        else if (name == "projection")
          p->performer.projection = as_view();
        else
          known = false;
        break;
      case ApproxMethod::kHyper:
        if (name == "block")
          p->hyper.block = as_int();
        else if (name == "samples")
          p->hyper.samples = as_int();
        else if (name == "lsh_bits")
          p->hyper.lsh_bits = as_int();
        else if (name == "min_seq_len")
          p->hyper.min_seq_len = as_int();
        else
          known = false;
        break;
      case ApproxMethod::kAgent:
        if (name == "agents")
          p->agent.agents = as_int();
        else if (name == "agent_bias")
          p->agent.agent_bias = as_view();
        else if (name == "query_bias")
          p->agent.query_bias = as_view();
        else if (name == "dwc")
          p->agent.dwc = as_view();
        else
          known = false;
        break;
      case ApproxMethod::kRouting:
        if (name == "clusters")
          p->routing.clusters = as_int();
        else if (name == "window")
          p->routing.window = as_int();
        else if (name == "centroids")
          p->routing.centroids = as_view();
        else if (name == "updated_centroids")
          p->routing.updated_centroids = as_view();
        else if (name == "ema")
          p->routing.ema = as_float();
        else
          known = false;
        break;
      case ApproxMethod::kHiLo:
        if (name == "grid_h")
          p->hilo.grid_h = as_int();
        else if (name == "grid_w")
          p->hilo.grid_w = as_int();
        else if (name == "window")
          p->hilo.window = as_int();
        else if (name == "lofi_heads")
          p->hilo.lofi_heads = as_int();
        else
          known = false;
        break;
    }
    if (!known) {
      ValueError(name + ": not an option of method " + ApproxMethodName(p->method));
    }
  }
}

ApproxParams MakeApproxParams(const std::string& method, nb::handle q, nb::handle k, nb::handle v,
                              nb::handle out, nb::handle lse, std::optional<double> scale,
                              bool causal, uint64_t seed, nb::dict options) {
  ApproxParams p;
  if (!ParseApproxMethod(method, &p.method)) {
    ValueError("method: expected one of wersa, hyper, performer, agent, routing, hilo, got '" +
               method + "'");
  }
  p.q = ToView(q, "q");
  p.k = ToView(k, "k");
  p.v = ToView(v, "v");
  p.out = ToView(out, "out");
  p.lse = ToView(lse, "lse");
  p.scale = OptionalScale(scale);
  p.causal = causal;
  p.seed = seed;
  ApplyApproxOptions(&p, options);
  return p;
}

void ApproxForwardPy(const std::string& method, nb::handle q, nb::handle k, nb::handle v,
                     nb::handle out, nb::handle lse, std::optional<double> scale, bool causal,
                     uint64_t seed, nb::dict options, int32_t threads) {
  const ApproxParams p = MakeApproxParams(method, q, k, v, out, lse, scale, causal, seed, options);
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return ApproxAttention(p, ctx); });
}

void ApproxBackwardPy(const std::string& method, nb::handle dout, nb::handle q, nb::handle k,
                      nb::handle v, nb::handle dq, nb::handle dk, nb::handle dv,
                      std::optional<double> scale, bool causal, uint64_t seed, nb::dict options,
                      int32_t threads) {
  ApproxBackwardParams p;
  p.forward =
      MakeApproxParams(method, q, k, v, nb::none(), nb::none(), scale, causal, seed, options);
  p.dout = ToView(dout, "dout");
  p.dq = ToView(dq, "dq");
  p.dk = ToView(dk, "dk");
  p.dv = ToView(dv, "dv");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return ApproxAttentionBackward(p, ctx); });
}

// ---- Long convolutions ------------------------------------------------------------------------

LongConvPath ParseLongConvPath(const std::string& path) {
  if (path == "auto") return LongConvPath::kAuto;
  if (path == "direct") return LongConvPath::kDirect;
  if (path == "fft") return LongConvPath::kFft;
  ValueError("path: expected auto, direct or fft, got '" + path + "'");
}

LongConvParams MakeLongConvParams(nb::handle u, nb::handle filter, nb::handle bias, nb::handle y,
                                  const std::string& path) {
  LongConvParams p;
  p.u = ToView(u, "u");
  p.filter = ToView(filter, "filter");
  p.bias = ToView(bias, "bias");
  p.y = ToView(y, "y");
  p.path = ParseLongConvPath(path);
  return p;
}

void LongConv1DPy(nb::handle u, nb::handle filter, nb::handle bias, nb::handle y,
                  const std::string& path, int32_t threads) {
  const LongConvParams p = MakeLongConvParams(u, filter, bias, y, path);
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return LongConv1D(p, ctx); });
}

// du, dfilter, dbias: None skips that gradient.
void LongConv1DBackwardPy(nb::handle dy, nb::handle u, nb::handle filter, nb::handle bias,
                          nb::handle du, nb::handle dfilter, nb::handle dbias,
                          const std::string& path, int32_t threads) {
  LongConvBackwardParams p;
  p.forward = MakeLongConvParams(u, filter, bias, nb::none(), path);
  p.dy = ToView(dy, "dy");
  p.du = ToView(du, "du");
  p.dfilter = ToView(dfilter, "dfilter");
  p.dbias = ToView(dbias, "dbias");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return LongConv1DBackward(p, ctx); });
}

H3Params MakeH3Params(nb::handle q, nb::handle k, nb::handle v, nb::handle shift_filter,
                      nb::handle shift_bias, nb::handle ssm_filter, nb::handle ssm_bias,
                      nb::handle out, const std::string& path) {
  H3Params p;
  p.q = ToView(q, "q");
  p.k = ToView(k, "k");
  p.v = ToView(v, "v");
  p.shift_filter = ToView(shift_filter, "shift_filter");
  p.shift_bias = ToView(shift_bias, "shift_bias");
  p.ssm_filter = ToView(ssm_filter, "ssm_filter");
  p.ssm_bias = ToView(ssm_bias, "ssm_bias");
  p.out = ToView(out, "out");
  p.path = ParseLongConvPath(path);
  return p;
}

void H3Py(nb::handle q, nb::handle k, nb::handle v, nb::handle shift_filter, nb::handle shift_bias,
          nb::handle ssm_filter, nb::handle ssm_bias, nb::handle out, const std::string& path,
          int32_t threads) {
  const H3Params p =
      MakeH3Params(q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, out, path);
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return H3Layer(p, ctx); });
}

// Every gradient output may be None (not computed).
void H3BackwardPy(nb::handle dout, nb::handle q, nb::handle k, nb::handle v,
                  nb::handle shift_filter, nb::handle shift_bias, nb::handle ssm_filter,
                  nb::handle ssm_bias, nb::handle dq, nb::handle dk, nb::handle dv,
                  nb::handle dshift_filter, nb::handle dshift_bias, nb::handle dssm_filter,
                  nb::handle dssm_bias, const std::string& path, int32_t threads) {
  H3BackwardParams p;
  p.forward =
      MakeH3Params(q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, nb::none(), path);
  p.dout = ToView(dout, "dout");
  p.dq = ToView(dq, "dq");
  p.dk = ToView(dk, "dk");
  p.dv = ToView(dv, "dv");
  p.dshift_filter = ToView(dshift_filter, "dshift_filter");
  p.dshift_bias = ToView(dshift_bias, "dshift_bias");
  p.dssm_filter = ToView(dssm_filter, "dssm_filter");
  p.dssm_bias = ToView(dssm_bias, "dssm_bias");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return H3LayerBackward(p, ctx); });
}

// ---- The diagonal SSM ------------------------------------------------------------------------

DiagonalSsmParams MakeSsmParams(nb::handle a, nb::handle b, nb::handle w, nb::handle skip) {
  DiagonalSsmParams p;
  p.a = ToView(a, "a");
  p.b = ToView(b, "b");
  p.w = ToView(w, "w");
  p.skip = ToView(skip, "skip");
  return p;
}

// skip: None for no skip term (the kernel does not read it).
void SsmKernelPy(nb::handle a, nb::handle b, nb::handle w, nb::handle skip, nb::handle filter,
                 int32_t threads) {
  const DiagonalSsmParams p = MakeSsmParams(a, b, w, skip);
  const TensorView f = ToView(filter, "filter");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return DiagonalSsmKernel(p, f, ctx); });
}

// state: None starts from zero and keeps nothing; an array is read and overwritten in place.
void SsmScanPy(nb::handle a, nb::handle b, nb::handle w, nb::handle skip, nb::handle u,
               nb::handle y, nb::handle state, int32_t threads) {
  DiagonalSsmScanParams p;
  p.ssm = MakeSsmParams(a, b, w, skip);
  p.u = ToView(u, "u");
  p.y = ToView(y, "y");
  p.state = ToView(state, "state");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return DiagonalSsmScan(p, ctx); });
}

// ---- Vision ----------------------------------------------------------------------------------

void ChannelAttentionPy(nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                        std::optional<double> scale, int32_t threads) {
  ChannelAttentionParams p;
  p.q = ToView(q, "q");
  p.k = ToView(k, "k");
  p.v = ToView(v, "v");
  p.out = ToView(out, "out");
  p.scale = OptionalScale(scale);
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return ChannelAttention(p, ctx); });
}

// ---- Block-mask builders ---------------------------------------------------------------------

void BuildS2Py(nb::handle out, int64_t heads, int64_t num_q_blocks, int64_t num_k_blocks,
               int64_t local_blocks, int64_t vert_stride, int64_t offset, bool causal,
               int32_t threads) {
  S2MaskParams p;
  p.heads = heads;
  p.num_q_blocks = num_q_blocks;
  p.num_k_blocks = num_k_blocks;
  p.local_blocks = local_blocks;
  p.vert_stride = vert_stride;
  p.offset = offset;
  p.causal = causal;
  p.out = ToView(out, "out");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return BuildS2BlockMask(p, ctx); });
}

void BuildRadialPy(nb::handle out, int64_t frames, int64_t tokens_per_frame, int64_t block,
                   double decay_factor, int32_t threads) {
  RadialMaskParams p;
  p.frames = frames;
  p.tokens_per_frame = tokens_per_frame;
  p.block = block;
  p.decay_factor = decay_factor;
  p.out = ToView(out, "out");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return BuildRadialBlockMask(p, ctx); });
}

void SelectBlocksPy(nb::handle q, nb::handle k, nb::handle scores, nb::handle out, int64_t block_q,
                    int64_t block_k, int64_t top_k, double threshold, std::optional<double> scale,
                    bool causal, bool top_left, int32_t threads) {
  BlockSelectParams p;
  p.q = ToView(q, "q");
  p.k = ToView(k, "k");
  p.scores = ToView(scores, "scores");
  p.block_q = block_q;
  p.block_k = block_k;
  p.top_k = top_k;
  p.threshold = static_cast<float>(threshold);
  p.scale = OptionalScale(scale);
  p.causal = causal;
  p.align = top_left ? MaskAlign::kTopLeft : MaskAlign::kBottomRight;
  p.out = ToView(out, "out");
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return SelectBlocks(p, ctx); });
}

// Functions whose arguments may each be None (optional arrays, the default scale): nanobind
// refuses None for an argument unless it is annotated so.
template <typename T>
constexpr auto NoneOk() {
  return nb::arg().none();
}
template <typename R, typename... Args>
void DefNoneOk(nb::module_& m, const char* name, R (*f)(Args...)) {
  m.def(name, f, NoneOk<Args>()...);
}
template <typename C, typename R, typename... Args>
void DefNoneOk(nb::class_<C>& c, const char* name, R (C::*f)(Args...)) {
  c.def(name, f, NoneOk<Args>()...);
}

// ---- KV cache eviction (kv_policy.h) --------------------------------------------------------
// Keep-sets go to Python as one flat i32 array the Python side sized (sum over b of Hkv *
// min(budget, seq_lens[b])), head h of sequence b at [offsets[b] + h * count_b, ...); CompactPy
// takes them back the same way with their counts.

void StoreKeep(const KeepSet& keep, nb::handle tokens) {
  const TensorView t = ToView(tokens, "tokens");
  const int64_t n = static_cast<int64_t>(keep.tokens.size());
  if (t.dtype != DType::kI32 || t.rank != 1 || t.shape[0] != n || (n > 1 && t.strides[0] != 1)) {
    ValueError("tokens: expected a contiguous int32 [" + std::to_string(n) + "] array");
  }
  if (n > 0) std::memcpy(t.data, keep.tokens.data(), static_cast<size_t>(n) * sizeof(int32_t));
}

PoolKind ParsePool(const std::string& pool) {
  if (pool == "max") return PoolKind::kMax;
  if (pool == "avg") return PoolKind::kAvg;
  ValueError("pool: expected 'max' or 'avg', got '" + pool + "'");
}

void PolicyKeepPy(const std::string& policy, nb::handle stats, nb::handle stats_sq, int64_t rows,
                  nb::handle seq_lens, int64_t num_kv_heads, int64_t budget, int64_t window,
                  int64_t kernel, const std::string& pool, int64_t sinks, double gamma,
                  nb::handle tokens) {
  const EvictionTarget target{ToView(seq_lens, "seq_lens"), num_kv_heads, budget};
  const TensorView s = ToView(stats, "stats"), sq = ToView(stats_sq, "stats_sq");
  KeepSet keep;
  if (policy == "streaming") {
    RunWithoutGil([&] { return StreamingLLMKeep({target, sinks}, &keep); });
  } else if (policy == "h2o") {
    RunWithoutGil([&] { return H2OKeep({target, s, window}, &keep); });
  } else if (policy == "tova") {
    RunWithoutGil([&] { return TovaKeep({target, s}, &keep); });
  } else if (policy == "snapkv") {
    const PoolKind kind = ParsePool(pool);
    RunWithoutGil([&] { return SnapKVKeep({target, s, window, kernel, kind}, &keep); });
  } else if (policy == "cake") {
    CakeParams params;
    params.window = window;
    params.kernel = kernel;
    params.pool = ParsePool(pool);
    params.gamma = gamma;
    RunWithoutGil([&] { return CakeKeep(params, target, {s, sq, rows}, &keep); });
  } else {
    ValueError("policy: expected streaming, h2o, tova, snapkv or cake, got '" + policy + "'");
  }
  StoreKeep(keep, tokens);
}

// (preference, dispersion, shift).
std::vector<double> CakePreferencePy(nb::handle key_mass, nb::handle key_mass_sq, int64_t rows,
                                     nb::handle seq_lens, int64_t num_kv_heads, double tau1,
                                     double tau2) {
  CakeParams params;
  params.tau1 = tau1;
  params.tau2 = tau2;
  const EvictionTarget target{ToView(seq_lens, "seq_lens"), num_kv_heads, 1};
  const CakeLayerStats st{ToView(key_mass, "key_mass"), ToView(key_mass_sq, "key_mass_sq"), rows};
  std::vector<double> r(3, 0.0);
  RunWithoutGil([&] { return CakeLayerPreference(params, target, st, &r[0], &r[1], &r[2]); });
  return r;
}

std::vector<int64_t> PyramidBudgetsPy(int64_t total, int64_t num_layers, double beta) {
  std::vector<int64_t> budgets;
  Check(PyramidKVBudgets(total, num_layers, beta, &budgets));
  return budgets;
}

// The budgets after each of the preferences arrives (CakeAllocator).
std::vector<std::vector<int64_t>> CakeBudgetsPy(const std::vector<double>& preferences,
                                                int64_t num_layers, int64_t total,
                                                int64_t reserved) {
  CakeAllocator alloc;
  Check(alloc.Init(num_layers, total, reserved));
  std::vector<std::vector<int64_t>> out;
  for (double p : preferences) {
    Check(alloc.AddLayer(p));
    out.push_back(alloc.budgets());
  }
  return out;
}

// CompactKV on a pool; seq_lens and block_table (the Python KVCache's arrays) are written.
std::vector<int32_t> CompactPy(KVPool& pool, nb::handle seq_lens, nb::handle block_table,
                               nb::handle counts, nb::handle tokens, nb::handle positions,
                               bool reindex, int64_t rotary_dim, double rotary_base,
                               bool interleaved, int32_t threads) {
  const TensorView c = ToView(counts, "counts"), t = ToView(tokens, "tokens");
  if (c.dtype != DType::kI32 || c.rank != 1 || (c.shape[0] > 1 && c.strides[0] != 1) ||
      t.dtype != DType::kI32 || t.rank != 1 || (t.shape[0] > 1 && t.strides[0] != 1)) {
    ValueError("keep: expected contiguous int32 counts and tokens");
  }
  KeepSet keep;
  keep.num_kv_heads = pool.view().num_kv_heads;
  const int32_t* cp = static_cast<const int32_t*>(c.data);
  keep.counts.assign(cp, cp + c.shape[0]);
  keep.offsets.assign(keep.counts.size() + 1, 0);
  for (size_t b = 0; b < keep.counts.size(); ++b) {
    keep.offsets[b + 1] = keep.offsets[b] + keep.num_kv_heads * int64_t{keep.counts[b]};
  }
  const int32_t* tp = static_cast<const int32_t*>(t.data);
  keep.tokens.assign(tp, tp + t.shape[0]);
  CompactKVParams p;
  p.cache = pool.view();
  p.batch.seq_lens = ToView(seq_lens, "seq_lens");
  p.batch.block_table = ToView(block_table, "block_table");
  p.batch.batch = p.batch.seq_lens.rank >= 1 ? p.batch.seq_lens.shape[0] : 0;
  p.keep = &keep;
  p.positions = ToView(positions, "positions");
  p.reindex = reindex;
  p.rotary.rotary_dim = rotary_dim;
  p.rotary.base = static_cast<float>(rotary_base);
  p.rotary.interleaved = interleaved;
  CompactKVResult result;
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return CompactKV(p, ctx, &result); });
  return result.freed_pages;
}

// ---- Ring attention steps (distributed.h), behind python/tessera/distributed.py --------------
// The Python driver owns the communication (torch.distributed or mpi4py) and calls one step per
// visiting K/V block. Segments travel as (global_start, local_start, length) tuples.

using SegmentTuple = std::tuple<int64_t, int64_t, int64_t>;

std::vector<ShardSegment> ToSegments(const std::vector<SegmentTuple>& tuples) {
  std::vector<ShardSegment> segments;
  segments.reserve(tuples.size());
  for (const auto& [global_start, local_start, length] : tuples) {
    segments.push_back({global_start, local_start, length});
  }
  return segments;
}

ShardLayout ParseShardLayout(const std::string& layout) {
  if (layout == ShardLayoutName(ShardLayout::kContiguous)) return ShardLayout::kContiguous;
  if (layout == ShardLayoutName(ShardLayout::kZigzag)) return ShardLayout::kZigzag;
  ValueError("layout: expected 'contiguous' or 'zigzag', got '" + layout + "'");
}

void RingForwardStepPy(nb::handle q, nb::handle k_block, nb::handle v_block, nb::handle acc_out,
                       nb::handle acc_lse, const std::vector<SegmentTuple>& q_segments,
                       const std::vector<SegmentTuple>& kv_segments, bool causal,
                       std::optional<double> scale, double softcap, int32_t threads) {
  AttentionParams p;
  p.q = ToView(q, "q");
  p.k = ToView(k_block, "k_block");
  p.v = ToView(v_block, "v_block");
  p.causal = causal;
  p.scale = OptionalScale(scale);
  p.softcap = static_cast<float>(softcap);
  const TensorView acc_out_view = ToView(acc_out, "acc_out");
  const TensorView acc_lse_view = ToView(acc_lse, "acc_lse");
  const std::vector<ShardSegment> q_segs = ToSegments(q_segments);
  const std::vector<ShardSegment> kv_segs = ToSegments(kv_segments);
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil(
      [&] { return RingForwardStep(p, q_segs, kv_segs, acc_out_view, acc_lse_view, ctx); });
}

void RingFinishForwardPy(nb::handle acc_out, nb::handle acc_lse, nb::handle out, nb::handle lse) {
  const TensorView a = ToView(acc_out, "acc_out"), al = ToView(acc_lse, "acc_lse");
  const TensorView o = ToView(out, "out"), l = ToView(lse, "lse");
  RunWithoutGil([&] { return RingFinishForward(a, al, o, l); });
}

void RingBackwardStepPy(nb::handle q, nb::handle k_block, nb::handle v_block, nb::handle out,
                        nb::handle lse, nb::handle dout, nb::handle dq_acc, nb::handle dk_acc,
                        nb::handle dv_acc, const std::vector<SegmentTuple>& q_segments,
                        const std::vector<SegmentTuple>& kv_segments, bool causal,
                        std::optional<double> scale, double softcap, int32_t threads) {
  AttentionBackwardParams p;
  p.forward.q = ToView(q, "q");
  p.forward.k = ToView(k_block, "k_block");
  p.forward.v = ToView(v_block, "v_block");
  p.forward.out = ToView(out, "out");
  p.forward.lse = ToView(lse, "lse");
  p.forward.causal = causal;
  p.forward.scale = OptionalScale(scale);
  p.forward.softcap = static_cast<float>(softcap);
  p.dout = ToView(dout, "dout");
  const TensorView dq = ToView(dq_acc, "dq_acc"), dk = ToView(dk_acc, "dk_acc");
  const TensorView dv = ToView(dv_acc, "dv_acc");
  const std::vector<ShardSegment> q_segs = ToSegments(q_segments);
  const std::vector<ShardSegment> kv_segs = ToSegments(kv_segments);
  const Context ctx = MakeContext(threads, 0);
  RunWithoutGil([&] { return RingBackwardStep(p, q_segs, kv_segs, dq, dk, dv, ctx); });
}

std::vector<std::vector<SegmentTuple>> PlanShardsPy(const std::string& layout,
                                                    const std::vector<int64_t>& lengths) {
  std::vector<std::vector<ShardSegment>> segments;
  Check(PlanShards(ParseShardLayout(layout), lengths, &segments));
  std::vector<std::vector<SegmentTuple>> result(segments.size());
  for (size_t r = 0; r < segments.size(); ++r) {
    for (const ShardSegment& s : segments[r]) {
      result[r].emplace_back(s.global_start, s.local_start, s.length);
    }
  }
  return result;
}

int64_t ZigzagShardLengthPy(int64_t total, int32_t size, int32_t rank) {
  if (total < 0) ValueError("total: expected >= 0 tokens, got " + std::to_string(total));
  if (size < 1) ValueError("size: expected >= 1 ranks, got " + std::to_string(size));
  if (rank < 0 || rank >= size) {
    ValueError("rank: expected in [0, " + std::to_string(size) + "), got " + std::to_string(rank));
  }
  return ZigzagShardLength(total, size, rank);
}

}  // namespace
}  // namespace tessera::python

NB_MODULE(_C, m) {
  using namespace tessera::python;
  namespace t = tessera;
  m.doc() = "tessera's extension module (use the `tessera` package, not this module)";
  m.attr("__version__") = TESSERA_VERSION_STRING;
  m.attr("MAX_DECODE_QUERIES") = t::kMaxDecodeQueries;
  m.attr("MAX_LINEAR_FEATURE_DIM") = t::kMaxLinearFeatureDim;

  DefNoneOk(m, "attention_forward", &AttentionForwardPy);
  DefNoneOk(m, "attention_backward", &AttentionBackwardPy);
  DefNoneOk(m, "attention_stats", &AttentionStatsPy);
  DefNoneOk(m, "merge_states", &MergeStatesPy);
  DefNoneOk(m, "apply_rotary", &ApplyRotaryPy);
  DefNoneOk(m, "linear_forward", &LinearForwardPy);
  DefNoneOk(m, "linear_backward", &LinearBackwardPy);
  m.def("linear_feature_dim", &LinearFeatureDimPy, nb::arg("feature_map"), nb::arg("dk"),
        nb::arg("lrpe") = false);
  DefNoneOk(m, "lasp2_forward", &Lasp2ForwardPy);
  DefNoneOk(m, "lasp2_backward", &Lasp2BackwardPy);
  DefNoneOk(m, "sequence_parallel_forward", &SequenceParallelForwardPy);
  DefNoneOk(m, "sequence_parallel_backward", &SequenceParallelBackwardPy);
  m.def("join_with_error", &JoinWithErrorPy);
  DefNoneOk(m, "approx_forward", &ApproxForwardPy);
  DefNoneOk(m, "approx_backward", &ApproxBackwardPy);
  DefNoneOk(m, "long_conv1d", &LongConv1DPy);
  DefNoneOk(m, "long_conv1d_backward", &LongConv1DBackwardPy);
  DefNoneOk(m, "h3", &H3Py);
  DefNoneOk(m, "h3_backward", &H3BackwardPy);
  DefNoneOk(m, "ssm_kernel", &SsmKernelPy);
  DefNoneOk(m, "ssm_scan", &SsmScanPy);
  DefNoneOk(m, "channel_attention", &ChannelAttentionPy);
  DefNoneOk(m, "build_s2", &BuildS2Py);
  DefNoneOk(m, "build_radial", &BuildRadialPy);
  DefNoneOk(m, "select_blocks", &SelectBlocksPy);
  nb::class_<KVPool> pool(m, "KVPool");
  pool.def(nb::init<const std::string&, int64_t, int64_t, int64_t, int64_t>())
      .def_prop_ro("bytes", &KVPool::bytes);
  DefNoneOk(pool, "append", &KVPool::Append);
  DefNoneOk(pool, "read", &KVPool::Read);
  DefNoneOk(pool, "decode", &KVPool::Decode);

  // Lower case, as the lists below and set_simd_target (the library's own name is upper case).
  m.def("simd_target", [] {
    std::string name = t::SimdTargetName();
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return name;
  });
  m.def("compiled_simd_targets", &t::CompiledSimdTargets);
  m.def("supported_simd_targets", &t::SupportedSimdTargets);
  m.def("set_simd_target", [](const std::string& name) { Check(t::SetSimdTarget(name)); });
  m.def("hardware_threads", &t::HardwareThreads);
  m.def("resolve_threads", [](int32_t threads) {
    t::Context ctx;
    ctx.num_threads = threads;
    return t::ResolveThreads(ctx);
  });

  // ---- KV cache files (tessera/kv_file.h), behind python/tessera/kv_file.py -------------------
  {
    auto float_array = [](nb::handle x, const char* name, int64_t n) {
      const t::TensorView v = ToView(x, name);
      if (v.data == nullptr || v.dtype != t::DType::kF32 || v.numel() != n || !v.is_contiguous()) {
        ValueError(std::string(name) + ": expected a contiguous float32 array of " +
                   std::to_string(n) + " values [Hkv, D]");
      }
      return static_cast<const float*>(v.data);
    };
    nb::class_<t::KVFile>(m, "KVFile")
        .def("__init__",
             [](t::KVFile* self, const std::string& path) {
               new (self) t::KVFile();
               Check(t::KVFile::Open(path, self));
             })
        .def_prop_ro("path", [](const t::KVFile& f) { return f.path(); })
        .def_prop_ro("dtype", [](const t::KVFile& f) { return t::KVDTypeName(f.info().dtype); })
        .def_prop_ro("page_size", [](const t::KVFile& f) { return f.info().page_size; })
        .def_prop_ro("num_kv_heads", [](const t::KVFile& f) { return f.info().num_kv_heads; })
        .def_prop_ro("head_dim", [](const t::KVFile& f) { return f.info().head_dim; })
        .def_prop_ro("num_pages", [](const t::KVFile& f) { return f.info().num_pages; })
        .def_prop_ro("tokens", [](const t::KVFile& f) { return f.info().tokens; })
        .def_prop_ro("file_bytes", [](const t::KVFile& f) { return f.info().file_bytes; })
        .def(
            "decode",
            [](const t::KVFile& f, nb::handle q, nb::handle out, nb::handle lse,
               std::optional<double> scale, bool causal, int64_t window_left, double softcap,
               nb::handle alibi_slopes, int64_t chunk_tokens, int64_t split_tokens,
               const std::string& reader, int32_t buffers, int64_t select_top_k,
               int32_t decode_threads, int32_t threads) {
              t::KVFileDecodeParams p;
              p.q = ToView(q, "q");
              p.out = ToView(out, "out");
              p.lse = ToView(lse, "lse");
              p.scale = OptionalScale(scale);
              p.causal = causal;
              p.window_left = window_left;
              p.softcap = static_cast<float>(softcap);
              p.alibi_slopes = ToView(alibi_slopes, "alibi_slopes");
              p.chunk_tokens = chunk_tokens;
              p.split_tokens = split_tokens;
              p.buffers = buffers;
              p.select_top_k = select_top_k;
              p.decode_threads = decode_threads;
              if (reader == "auto") {
                p.reader = t::KVFileReader::kAuto;
              } else if (reader == "io_uring") {
                p.reader = t::KVFileReader::kIoUring;
              } else if (reader == "threads") {
                p.reader = t::KVFileReader::kThreadPool;
              } else {
                ValueError("reader: expected one of auto, io_uring, threads, got '" + reader + "'");
              }
              const t::Context ctx = MakeContext(threads, 0);
              t::KVFileDecodeStats stats;
              RunWithoutGil([&] { return t::DecodeFromFile(f, p, ctx, &stats); });
              nb::dict d;
              d["reader"] = t::KVFileReaderName(stats.reader);
              d["direct"] = stats.direct;
              d["chunks"] = stats.chunks;
              d["chunks_total"] = stats.chunks_total;
              d["chunks_read"] = stats.chunks_read;
              d["bytes_read"] = stats.bytes_read;
              d["wait_ms"] = stats.wait_ms;
              d["decode_ms"] = stats.decode_ms;
              return d;
            },
            nb::arg("q"), nb::arg("out"), nb::arg("lse").none(), nb::arg("scale").none(),
            nb::arg("causal"), nb::arg("window_left"), nb::arg("softcap"),
            nb::arg("alibi_slopes").none(), nb::arg("chunk_tokens"), nb::arg("split_tokens"),
            nb::arg("reader"), nb::arg("buffers"), nb::arg("select_top_k"),
            nb::arg("decode_threads"), nb::arg("threads"));
    nb::class_<t::KVFileWriter>(m, "KVFileWriter")
        .def("__init__",
             [](t::KVFileWriter* self, const std::string& path, const std::string& dtype,
                int64_t page_size, int64_t num_kv_heads, int64_t head_dim, int64_t capacity) {
               new (self) t::KVFileWriter();
               Check(t::KVFileWriter::Create(path, ParseKVDType(dtype), page_size, num_kv_heads,
                                             head_dim, capacity, self));
             })
        .def_prop_ro("tokens", [](const t::KVFileWriter& w) { return w.tokens(); })
        .def("set_channel_scales",
             [float_array](t::KVFileWriter& w, nb::handle k, nb::handle v, int64_t n) {
               const float* kp = float_array(k, "k_channel_scales", n);
               const float* vp = float_array(v, "v_channel_scales", n);
               Check(w.SetChannelScales(kp, vp));
             })
        .def("append",
             [](t::KVFileWriter& w, nb::handle k, nb::handle v, int64_t rotary_dim,
                double rotary_base, bool interleaved, int32_t threads) {
               const t::TensorView kv = ToView(k, "k"), vv = ToView(v, "v");
               t::RotaryParams rot;
               rot.rotary_dim = rotary_dim;
               rot.base = static_cast<float>(rotary_base);
               rot.interleaved = interleaved;
               const t::Context ctx = MakeContext(threads, 0);
               RunWithoutGil([&] { return w.Append(kv, vv, rot, ctx); });
             })
        .def("finish", [](t::KVFileWriter& w) { RunWithoutGil([&] { return w.Finish(); }); });
    m.def(
        "save_kv_file",
        [](KVPool& pool, nb::handle seq_lens, nb::handle block_table, int64_t b,
           const std::string& path, int64_t page_size) {
          t::KVBatchView batch;
          batch.seq_lens = ToView(seq_lens, "seq_lens");
          batch.block_table = ToView(block_table, "block_table");
          batch.batch = batch.seq_lens.rank >= 1 ? batch.seq_lens.shape[0] : 0;
          const t::KVCacheView cache = pool.view();
          RunWithoutGil([&] { return t::SaveKVFile(cache, batch, b, path, page_size); });
        },
        nb::arg("pool"), nb::arg("seq_lens"), nb::arg("block_table").none(), nb::arg("b"),
        nb::arg("path"), nb::arg("page_size"));
  }
  // KV cache eviction (kv_policy.h; python/tessera/kv_policy.py).
  DefNoneOk(m, "policy_keep", &PolicyKeepPy);
  DefNoneOk(m, "cake_preference", &CakePreferencePy);
  m.def("pyramidkv_budgets", &PyramidBudgetsPy);
  m.def("cake_budgets", &CakeBudgetsPy);
  DefNoneOk(m, "compact_kv", &CompactPy);

  // Ring attention steps (distributed.h; python/tessera/distributed.py drives them).
  DefNoneOk(m, "ring_forward_step", &RingForwardStepPy);
  DefNoneOk(m, "ring_finish_forward", &RingFinishForwardPy);
  DefNoneOk(m, "ring_backward_step", &RingBackwardStepPy);
  m.def("plan_shards", &PlanShardsPy, nb::arg("layout"), nb::arg("lengths"));
  m.def("zigzag_shard_length", &ZigzagShardLengthPy, nb::arg("total"), nb::arg("size"),
        nb::arg("rank"));
}
