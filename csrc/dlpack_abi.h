// The DLPack ABI (https://github.com/dmlc/dlpack, include/dlpack/dlpack.h, the unversioned DLManagedTensor that
// every torch version consumes from a "dltensor" capsule). Only the members this extension fills in; the layout
// follows the specification so that consumers read these structs as theirs.
#pragma once

#include <cstdint>

namespace amoeba {
namespace dlpack {

enum DeviceType : int32_t { kDLCPU = 1, kDLCUDA = 2 };
enum DataTypeCode : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2 };

struct Device {
  int32_t device_type;  // DeviceType (a C enum: int-sized)
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

// Capsule names: a producer names its capsule kCapsuleName; a consumer that takes ownership renames it to
// kUsedCapsuleName, so a capsule destructor calls the deleter only when the name is still kCapsuleName.
constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

}  // namespace dlpack
}  // namespace amoeba
