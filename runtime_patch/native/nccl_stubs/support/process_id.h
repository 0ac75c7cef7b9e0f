// Stand-in for TVM's src/support/process_id.h, which the wheel's disco/nccl sources include as
// "../../../../support/process_id.h" but the wheel does not ship. nccl.cc uses nothing from it.
// build.py makes that relative path resolve here (see _relative_include_anchor).
#ifndef TVM_SUPPORT_PROCESS_ID_H_
#define TVM_SUPPORT_PROCESS_ID_H_
#endif  // TVM_SUPPORT_PROCESS_ID_H_
