// Stand-in for <tvm/support/serializer.h>: the apache-tvm wheel's public runtime headers include it
// but the wheel does not ship it. Written for tvm-tp-lab; only what those headers need is here.
//
// `Serializer<T>` is the customisation point of `support::Stream` (see io.h): a type that is not
// trivially copyable specialises it with `enabled = true` and static `Write`/`Read` functions
// (tvm/runtime/vm/executable.h does so for VMFuncInfo).
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_

namespace tvm {
namespace support {

class Stream;

template <typename T>
struct Serializer {
  static constexpr bool enabled = false;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SERIALIZER_H_
