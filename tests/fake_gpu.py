"""A stand-in GPU for machines without one: the device `fakegpu`, strict where a real GPU is strict.

    python tests/fake_gpu.py dpsom.py with device=fakegpu ...     # any entry point, on the stand-in device

Its tensors hold their numbers in CPU memory but report device `fakegpu:0`, and like CUDA tensors they
- refuse to meet a CPU tensor in an operation (a 0-dim CPU tensor, a scalar, is allowed, as CUDA allows it);
  copies between the two (`.to`, `.cpu()`, `copy_`) are the only way across;
- draw random numbers from a generator of the device's own, apart from the CPU's, whose state
  `torch.get_device_module("fakegpu").get_rng_state()` returns and whose `set_rng_state` takes, as
  torch.cuda's does, only a CPU byte tensor (a state on the device raises TypeError);
- count host syncs: every value read on the host (`.item()`, `float()`, `.tolist()`), copy to the CPU and
  operation whose output size depends on the data (nonzero, masked_select), in SYNCS.
The device's module answers is_available(), device_count() == 1 and the RNG calls; torch.manual_seed seeds it.
Saving one of its tensors (torch.save, pickle) raises: a CUDA tensor saved as it is carries its device, and
the file then opens only on a machine with that GPU, so whatever is saved must be copied to the host first.

What it cannot tell: speed, memory, CUDA's own kernels and their numerics, autocast on CUDA, cuDNN.
"""
import functools
import os
import runpy
import sys

import torch
from torch.utils._pytree import tree_flatten, tree_map

NAME = "fakegpu"
SYNCS = {"count": 0, "ops": []}
aten = torch.ops.aten
CROSSING = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
            aten._copy_from_and_resize.default}                      # the ops that may move data across
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.is_nonzero.default, aten.equal.default,
                  aten._local_scalar_dense.default}


class FakeGpuTensor(torch.Tensor):
    """A tensor on `fakegpu:0` whose numbers are `inner`, a CPU tensor."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                device=DEVICE, requires_grad=inner.requires_grad,
                                                storage_offset=inner.storage_offset())
        t.inner = inner
        return t

    def __repr__(self):
        return f"FakeGpuTensor({self.inner!r})"

    def tolist(self):   # a CUDA tensor's tolist() copies to the host; a subclass's is refused by PyTorch
        _sync("tolist")
        return self.inner.tolist()

    def __reduce_ex__(self, protocol):   # torch.save (pickle) of a CUDA tensor tags it cuda:0, which only a GPU opens
        raise RuntimeError(f"a tensor on {DEVICE} is being saved: the file would open only where that device "
                           f"exists; save host copies (stand-in GPU)")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        on_device = any(isinstance(t, FakeGpuTensor) for t in flat)
        host = [t for t in flat if type(t) is torch.Tensor and t.dim() > 0]
        if on_device and host and func not in CROSSING:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{DEVICE} and cpu! (in {func}, stand-in GPU)")
        to_host = func is aten._to_copy.default and torch.device(kwargs.get("device") or DEVICE).type == "cpu"
        if to_host or func in DATA_DEPENDENT:
            _sync(str(func))
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == NAME:
            kwargs["device"] = torch.device("cpu")
        if isinstance(kwargs.get("generator"), torch.Generator):
            raise RuntimeError(f"Expected a '{NAME}' device type for generator but found 'cpu' (in {func}, stand-in GPU)")
        if kwargs.get("generator", "absent") is None or (
                "generator" in (a.name for a in func._schema.arguments) and "generator" not in kwargs):
            kwargs["generator"] = _generator()                   # the device's own random stream
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if to_host or func is aten._local_scalar_dense.default:
            return out
        return tree_map(lambda t: FakeGpuTensor(t) if type(t) is torch.Tensor else t, out)


def _sync(what: str) -> None:
    SYNCS["count"] += 1
    SYNCS["ops"].append(what)


def _unwrap(t):
    return t.inner if isinstance(t, FakeGpuTensor) else t


@functools.cache
def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class Module:
    """What torch.get_device_module("fakegpu") answers: availability, one device, its random stream."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def get_rng_state(device=0) -> torch.Tensor:
        return _generator().get_state()

    @staticmethod
    def set_rng_state(state, device=0) -> None:
        if not (type(state) is torch.Tensor and state.dtype == torch.uint8):   # torch.cuda's own refusal
            raise TypeError(f"RNG state must be a torch.ByteTensor on the CPU, got {type(state).__name__} on "
                            f"{getattr(state, 'device', None)}")
        _generator().set_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        _generator().manual_seed(int(seed))

    manual_seed_all = manual_seed

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def get_amp_supported_dtype() -> list:
        return [torch.bfloat16]


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return FakeGpuTensor(torch.empty(size, dtype=dtype, memory_format=memory_format))


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    return FakeGpuTensor(torch.empty_strided(size, stride, dtype=dtype))


# Registered on import, once a process (PyTorch has one such backend slot): the device exists from here on.
torch.utils.backend_registration._setup_privateuseone_for_python_backend(NAME, backend_module=Module())
_LIB = torch.library.Library("aten", "IMPL")   # the registrations last as long as this object
_LIB.impl("empty.memory_format", _empty, "PrivateUse1")
_LIB.impl("empty_strided", _empty_strided, "PrivateUse1")
DEVICE = torch.device(NAME, 0)


if __name__ == "__main__":   # run a script (dpsom.py, sweep.py ...) with the device installed
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
