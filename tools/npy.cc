// SPDX-License-Identifier: Apache-2.0
// .npy reader/writer. Format: 6-byte magic "\x93NUMPY", major and minor version bytes, a
// little-endian header length (uint16 for 1.0, uint32 for 2.0/3.0), then a Python dict literal
// {'descr': ..., 'fortran_order': ..., 'shape': (...), } padded with spaces and '\n', then the
// raw elements.
#include "npy.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

namespace tessera {
namespace cli {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
constexpr size_t kAlignment = 64;

// Closes the FILE on scope exit.
struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

// A tiny parser for the header dict; only the literal forms NumPy writes are accepted.
class HeaderParser {
 public:
  explicit HeaderParser(const std::string& text) : s_(text) {}

  bool Parse(std::string* descr, bool* fortran, std::vector<int64_t>* shape, std::string* err) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    SkipSpace();
    if (!Consume('{')) return Fail("expected '{' at the start of the header", err);
    while (true) {
      SkipSpace();
      if (Consume('}')) break;
      std::string key;
      if (!ParseString(&key)) return Fail("expected a quoted key", err);
      SkipSpace();
      if (!Consume(':')) return Fail("expected ':' after key '" + key + "'", err);
      SkipSpace();
      if (key == "descr") {
        if (!ParseString(descr)) return Fail("expected a string for 'descr'", err);
        have_descr = true;
      } else if (key == "fortran_order") {
        if (!ParseBool(fortran)) return Fail("expected True or False for 'fortran_order'", err);
        have_fortran = true;
      } else if (key == "shape") {
        if (!ParseShape(shape, err)) return false;
        have_shape = true;
      } else {
        return Fail("unexpected key '" + key + "'", err);
      }
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume('}')) break;
      return Fail("expected ',' or '}' after the value of '" + key + "'", err);
    }
    if (!have_descr || !have_fortran || !have_shape) {
      return Fail("the header must have the keys 'descr', 'fortran_order' and 'shape'", err);
    }
    return true;
  }

 private:
  static bool Fail(const std::string& what, std::string* err) {
    *err = "bad header: " + what;
    return false;
  }
  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n')) ++pos_;
  }
  bool Consume(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ConsumeWord(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }
  bool ParseString(std::string* out) {
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) return false;
    const char quote = s_[pos_++];
    const size_t end = s_.find(quote, pos_);
    if (end == std::string::npos) return false;
    *out = s_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return true;
  }
  bool ParseBool(bool* out) {
    if (ConsumeWord("True")) {
      *out = true;
      return true;
    }
    if (ConsumeWord("False")) {
      *out = false;
      return true;
    }
    return false;
  }
  bool ParseShape(std::vector<int64_t>* shape, std::string* err) {
    shape->clear();
    if (!Consume('(')) return Fail("expected a tuple for 'shape'", err);
    while (true) {
      SkipSpace();
      if (Consume(')')) return true;
      if (pos_ >= s_.size() || s_[pos_] < '0' || s_[pos_] > '9') {
        return Fail("expected a non-negative integer in 'shape'", err);
      }
      int64_t value = 0;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
        const int digit = s_[pos_++] - '0';
        if (value > (std::numeric_limits<int64_t>::max() - digit) / 10) {
          return Fail("a dimension in 'shape' is too large", err);
        }
        value = value * 10 + digit;
      }
      ConsumeWord("L");  // Python 2 long suffix, written by old NumPy versions
      shape->push_back(value);
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume(')')) return true;
      return Fail("expected ',' or ')' in 'shape'", err);
    }
  }

  const std::string& s_;
  size_t pos_ = 0;
};

// The .npy descr of each dtype the CLI reads or writes. Single-byte types carry NumPy's '|'
// (no byte order); '<' is accepted for them too.
struct DescrName {
  DType dtype;
  const char* descr;
  const char* numpy;  // NumPy's name, for messages
};
constexpr DescrName kDescrs[] = {
    {DType::kF32, "<f4", "float32"}, {DType::kF16, "<f2", "float16"}, {DType::kU8, "|u1", "uint8"},
    {DType::kBool, "|b1", "bool"},   {DType::kI32, "<i4", "int32"},
};

bool DTypeFromDescr(const std::string& descr, const std::vector<DType>& accepted, DType* dtype,
                    std::string* err) {
  std::string expected;
  for (size_t i = 0; i < accepted.size(); ++i) {
    for (const DescrName& d : kDescrs) {
      if (d.dtype != accepted[i]) continue;
      if (i > 0) expected += i + 1 == accepted.size() ? " or " : ", ";
      expected += "'" + std::string(d.descr) + "' (" + d.numpy + ")";
      const bool one_byte = d.descr[0] == '|';
      if (descr == d.descr || (one_byte && descr == "<" + std::string(d.descr + 1))) {
        *dtype = d.dtype;
        return true;
      }
    }
  }
  std::string hint;
  if (descr == ">f4" || descr == ">f2" || descr == ">i4") {
    hint = " (big-endian; convert with a.astype('<" + descr.substr(1) + "'))";
  } else if (descr == "<f8") {
    hint = " (float64; convert with a.astype(np.float32))";
  } else if (descr == "<u2" || descr == "<i2") {
    hint = " (16-bit integers; bf16 stored as uint16 is not supported, use float16 or float32)";
  } else if (descr == "<i8") {
    hint = " (int64; convert with a.astype(np.int32))";
  }
  *err = "unsupported dtype '" + descr + "'" + hint + "; expected " + expected;
  return false;
}

const char* DescrFromDType(DType dtype) {
  for (const DescrName& d : kDescrs) {
    if (d.dtype == dtype) return d.descr;
  }
  return nullptr;  // bf16: no NumPy dtype
}

// The fixed prefix: magic and version (kMagicLen + 2 bytes). Sets the size of the header length
// field that follows (2 bytes for 1.0, 4 for 2.0 / 3.0).
bool ParseVersion(const unsigned char* prefix, size_t* len_bytes, std::string* err) {
  if (std::memcmp(prefix, kMagic, kMagicLen) != 0) {
    *err = "not a .npy file (missing the \\x93NUMPY magic)";
    return false;
  }
  const int major = prefix[kMagicLen];
  if (major < 1 || major > 3) {
    *err = "unsupported .npy format version " + std::to_string(major) + "." +
           std::to_string(prefix[kMagicLen + 1]) + " (expected 1.0, 2.0 or 3.0)";
    return false;
  }
  *len_bytes = major == 1 ? 2 : 4;
  return true;
}

// The header dict's length, little-endian in `len_bytes` bytes; at most 16 MiB.
bool ParseHeaderLength(const unsigned char* bytes, size_t len_bytes, size_t* header_len,
                       std::string* err) {
  uint64_t len = 0;
  for (size_t i = 0; i < len_bytes; ++i) len |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  if (len > (1u << 24)) {
    *err = "bad header: implausible length " + std::to_string(len);
    return false;
  }
  *header_len = static_cast<size_t>(len);
  return true;
}

// The header dict: dtype (one of `accepted`), shape and the payload size in bytes. Every
// partial product of the shape's nonzero dimensions fits int64 in bytes, so strides and sizes
// derived from the shape later cannot overflow either.
bool ParseHeaderDict(const std::string& header, const std::vector<DType>& accepted, DType* dtype,
                     std::vector<int64_t>* shape, uint64_t* nbytes, std::string* err) {
  std::string descr;
  bool fortran = false;
  if (!HeaderParser(header).Parse(&descr, &fortran, shape, err)) return false;
  if (!DTypeFromDescr(descr, accepted, dtype, err)) return false;
  if (fortran && shape->size() > 1) {
    *err = "Fortran-order arrays are not supported; save with np.ascontiguousarray(a)";
    return false;
  }
  const uint64_t elem = DTypeSize(*dtype);
  const uint64_t max_bytes = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t numel = 1, span = 1;  // span: the product of the nonzero dimensions
  for (int64_t d : *shape) {
    const uint64_t u = static_cast<uint64_t>(d);
    if (d != 0 && span > max_bytes / elem / u) {
      *err = "shape " + ShapeToString(*shape) + " is too large";
      return false;
    }
    if (d != 0) span *= u;
    numel *= u;
  }
  *nbytes = numel * elem;
  return true;
}

}  // namespace

void AlignedFree::operator()(void* p) const { std::free(p); }

AlignedBytes AllocateAligned(size_t bytes) {
  // aligned_alloc wants a multiple of the alignment, and some libcs return nullptr for 0.
  const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  if (rounded < bytes) return AlignedBytes();
  return AlignedBytes(
      static_cast<uint8_t*>(std::aligned_alloc(kAlignment, rounded ? rounded : kAlignment)));
}

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

TensorView NpyArray::View() {
  if (shape.empty()) return MakeView1(data.get(), dtype, 1);
  if (shape.size() > 4) {  // TensorView holds 4 dims; keep the rank so validation rejects it
    TensorView view;
    view.data = data.get();
    view.dtype = dtype;
    view.rank = static_cast<int32_t>(shape.size());
    return view;
  }
  return MakeContiguousView(data.get(), dtype, static_cast<int32_t>(shape.size()), shape.data());
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

bool LoadNpy(const std::string& path, NpyArray* array, std::string* error) {
  return LoadNpy(path, {DType::kF32, DType::kF16}, array, error);
}

bool LoadNpy(const std::string& path, const std::vector<DType>& accepted, NpyArray* array,
             std::string* error) {
  auto fail = [&](const std::string& what) {
    *error = path + ": " + what;
    return false;
  };
  File file(std::fopen(path.c_str(), "rb"));
  if (!file) return fail(std::string("cannot open: ") + std::strerror(errno));

  std::string err;
  unsigned char prefix[kMagicLen + 2];
  size_t len_bytes = 0;
  if (std::fread(prefix, 1, sizeof(prefix), file.get()) != sizeof(prefix)) {
    return fail("not a .npy file (missing the \\x93NUMPY magic)");
  }
  if (!ParseVersion(prefix, &len_bytes, &err)) return fail(err);
  unsigned char len_buf[4] = {0, 0, 0, 0};
  if (std::fread(len_buf, 1, len_bytes, file.get()) != len_bytes) {
    return fail("truncated header length");
  }
  size_t header_len = 0;
  if (!ParseHeaderLength(len_buf, len_bytes, &header_len, &err)) return fail(err);
  std::string header(header_len, '\0');
  if (header_len > 0 && std::fread(&header[0], 1, header_len, file.get()) != header_len) {
    return fail("truncated header (expected " + std::to_string(header_len) + " bytes)");
  }

  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  if (!ParseHeaderDict(header, accepted, &dtype, &shape, &nbytes, &err)) return fail(err);

  // Check the payload size before allocating, so a truncated file fails fast and cheaply.
  const long data_start = std::ftell(file.get());
  if (data_start >= 0 && std::fseek(file.get(), 0, SEEK_END) == 0) {
    const long end = std::ftell(file.get());
    if (end >= 0 && static_cast<uint64_t>(end - data_start) < nbytes) {
      return fail("truncated: shape " + ShapeToString(shape) + " needs " + std::to_string(nbytes) +
                  " data bytes, the file has " + std::to_string(end - data_start));
    }
    std::fseek(file.get(), data_start, SEEK_SET);
  }

  AlignedBytes data = AllocateAligned(static_cast<size_t>(nbytes));
  if (!data) return fail("cannot allocate " + std::to_string(nbytes) + " bytes");
  // Chunked so a short read is reported at a useful offset and fread sizes stay moderate.
  constexpr size_t kChunk = size_t{64} << 20;
  for (uint64_t off = 0; off < nbytes;) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(kChunk, nbytes - off));
    const size_t got = std::fread(data.get() + off, 1, want, file.get());
    if (got != want) {
      return fail("truncated: expected " + std::to_string(nbytes) + " data bytes, read " +
                  std::to_string(off + got));
    }
    off += got;
  }
  array->dtype = dtype;
  array->shape = std::move(shape);
  array->data = std::move(data);
  return true;
}

bool ParseNpy(const void* bytes, size_t size, const std::vector<DType>& accepted, NpyArray* array,
              std::string* error) {
  const unsigned char* p = static_cast<const unsigned char*>(bytes);
  size_t len_bytes = 0, header_len = 0;
  if (size < kMagicLen + 2) {
    *error = "not a .npy file (missing the \\x93NUMPY magic)";
    return false;
  }
  if (!ParseVersion(p, &len_bytes, error)) return false;
  size_t pos = kMagicLen + 2;
  if (size - pos < len_bytes) {
    *error = "truncated header length";
    return false;
  }
  if (!ParseHeaderLength(p + pos, len_bytes, &header_len, error)) return false;
  pos += len_bytes;
  if (size - pos < header_len) {
    *error = "truncated header (expected " + std::to_string(header_len) + " bytes)";
    return false;
  }
  const std::string header(reinterpret_cast<const char*>(p + pos), header_len);
  pos += header_len;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  if (!ParseHeaderDict(header, accepted, &dtype, &shape, &nbytes, error)) return false;
  if (size - pos < nbytes) {
    *error = "truncated: shape " + ShapeToString(shape) + " needs " + std::to_string(nbytes) +
             " data bytes, the buffer has " + std::to_string(size - pos);
    return false;
  }
  AlignedBytes data = AllocateAligned(static_cast<size_t>(nbytes));
  if (!data) {
    *error = "cannot allocate " + std::to_string(nbytes) + " bytes";
    return false;
  }
  if (nbytes > 0) std::memcpy(data.get(), p + pos, static_cast<size_t>(nbytes));
  array->dtype = dtype;
  array->shape = std::move(shape);
  array->data = std::move(data);
  return true;
}

bool NpyHeader(DType dtype, const std::vector<int64_t>& shape, std::string* head,
               std::string* error) {
  const char* descr = DescrFromDType(dtype);
  if (descr == nullptr) {
    *error = std::string("cannot write dtype ") + DTypeName(dtype) + " to .npy";
    return false;
  }
  std::string header = std::string("{'descr': '") + descr +
                       "', 'fortran_order': False, 'shape': " + ShapeToString(shape) + ", }";
  // Pad with spaces and end with '\n' so the payload starts on a 64-byte boundary, as NumPy
  // does; version 2.0 only when the padded header overflows 1.0's uint16 length.
  auto padded_len = [&](size_t prefix_len) {
    return (prefix_len + header.size() + 1 + kAlignment - 1) / kAlignment * kAlignment - prefix_len;
  };
  const bool v2 = padded_len(kMagicLen + 4) > 65535;
  const size_t prefix = kMagicLen + (v2 ? 6 : 4);
  header.append(padded_len(prefix) - header.size() - 1, ' ');
  header.push_back('\n');
  const uint32_t hlen = static_cast<uint32_t>(header.size());

  *head = std::string(kMagic, kMagicLen);
  head->push_back(static_cast<char>(v2 ? 2 : 1));
  head->push_back(0);
  head->push_back(static_cast<char>(hlen & 0xff));
  head->push_back(static_cast<char>((hlen >> 8) & 0xff));
  if (v2) {
    head->push_back(static_cast<char>((hlen >> 16) & 0xff));
    head->push_back(static_cast<char>((hlen >> 24) & 0xff));
  }
  *head += header;
  return true;
}

bool SaveNpy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
             const void* data, std::string* error) {
  auto fail = [&](const std::string& what) {
    *error = path + ": " + what;
    return false;
  };
  std::string head, err;
  if (!NpyHeader(dtype, shape, &head, &err)) return fail(err);

  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const size_t nbytes = static_cast<size_t>(numel) * DTypeSize(dtype);

  File file(std::fopen(path.c_str(), "wb"));
  if (!file) return fail(std::string("cannot open for writing: ") + std::strerror(errno));
  if (std::fwrite(head.data(), 1, head.size(), file.get()) != head.size() ||
      (nbytes > 0 && std::fwrite(data, 1, nbytes, file.get()) != nbytes)) {
    return fail(std::string("write failed: ") + std::strerror(errno));
  }
  std::FILE* raw = file.release();
  if (std::fclose(raw) != 0) return fail(std::string("write failed: ") + std::strerror(errno));
  return true;
}

}  // namespace cli
}  // namespace tessera
