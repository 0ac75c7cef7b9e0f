"""The transfers between pipeline stages that the compiled stage functions call (engine/model:
`pp` > 1), on any target: Python over disco's point-to-point operations, which the session's CCL
carries (NCCL between GPUs, cpu_shm's inboxes on the CPU). A disco session with pp groups of tp
workers: worker w is tensor-parallel rank w % tp of stage w // tp.

  PP_SEND_NEXT(x, *outs)              x to the next stage's worker of this tp rank; `outs` are left
                                      as they are (the placeholder results a non-last stage returns)
  PP_SEND_FIRST(*ins, tp, pp, *outs)  each input to the first stage's worker of this tp rank; `outs`
                                      are left as they are (only the first stage's results are read:
                                      the host reads worker 0, and the next step's tokens are the
                                      first stage's)
  PP_RECV_LAST(*ins, tp, pp, *outs)   each output received from the last stage's worker of this tp
                                      rank (the inputs give only the shapes)
The activations a stage receives come through TVM's own `runtime.disco.recv_from_prev_group`.
"""

from __future__ import annotations

from runtime_patch import functions


def _global(name: str):
    import tvm_ffi

    return tvm_ffi.get_global_func(name)


def _split(args: tuple) -> tuple[tuple, int, int, tuple]:
    k = (len(args) - 2) // 2
    return args[:k], int(args[k]), int(args[k + 1]), args[k + 2:]


def send_next(x, *outs) -> None:
    _global("runtime.disco.send_to_next_group")(x)


def send_first(*args) -> None:
    ins, tp, pp, outs = _split(args)
    first = int(_global("runtime.disco.worker_rank")()) - (pp - 1) * tp
    send = _global("runtime.disco.send_to_worker")
    for value in ins:
        send(value, first)


def recv_last(*args) -> None:
    _, tp, pp, outs = _split(args)
    last = int(_global("runtime.disco.worker_rank")()) + (pp - 1) * tp
    recv = _global("runtime.disco.recv_from_worker")
    for out in outs:
        recv(out, last)


IMPLEMENTATIONS = {
    functions.PP_SEND_NEXT: send_next,
    functions.PP_SEND_FIRST: send_first,
    functions.PP_RECV_LAST: recv_last,
}
