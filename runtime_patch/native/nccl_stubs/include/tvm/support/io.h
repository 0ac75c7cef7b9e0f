// Stand-in for <tvm/support/io.h>: the apache-tvm wheel's public runtime headers
// (tvm/runtime/tensor.h, tvm/runtime/vm/executable.h) include it but the wheel does not ship it.
// Written for tvm-tp-lab. Plugins compiled against it never pass a Stream to the TVM libraries;
// the interface only has to let those headers' inline code compile.
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_

#include <tvm/support/serializer.h>

#include <cstddef>
#include <type_traits>

namespace tvm {
namespace support {

/*! \brief A byte stream. Values are written as their raw bytes unless `Serializer<T>` is enabled. */
class Stream {
 public:
  virtual ~Stream() = default;
  /*! \return the number of bytes read (less than `size` at the end of the stream) */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \return the number of bytes written */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  bool Read(T* out) {
    if constexpr (Serializer<T>::enabled) {
      return Serializer<T>::Read(this, out);
    } else {
      static_assert(std::is_trivially_copyable_v<T>, "specialise support::Serializer<T>");
      return Read(static_cast<void*>(out), sizeof(T)) == sizeof(T);
    }
  }

  template <typename T>
  void Write(const T& value) {
    if constexpr (Serializer<T>::enabled) {
      Serializer<T>::Write(this, value);
    } else {
      static_assert(std::is_trivially_copyable_v<T>, "specialise support::Serializer<T>");
      Write(static_cast<const void*>(&value), sizeof(T));
    }
  }

  template <typename T>
  bool ReadArray(T* data, size_t count) {
    if constexpr (Serializer<T>::enabled) {
      for (size_t i = 0; i < count; ++i) {
        if (!Serializer<T>::Read(this, data + i)) return false;
      }
      return true;
    } else {
      return Read(static_cast<void*>(data), sizeof(T) * count) == sizeof(T) * count;
    }
  }

  template <typename T>
  void WriteArray(const T* data, size_t count) {
    if constexpr (Serializer<T>::enabled) {
      for (size_t i = 0; i < count; ++i) Serializer<T>::Write(this, data[i]);
    } else {
      Write(static_cast<const void*>(data), sizeof(T) * count);
    }
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_IO_H_
