#!/usr/bin/env python3
"""Compile .cu files with NVRTC for sm_90 on a machine without a GPU (syntax/type check).

NVRTC comes from the `nvidia-cuda-nvrtc` wheel (and headers from `nvidia-cuda-runtime`),
unpacked somewhere; point NV_ROOT at the folder holding lib/libnvrtc.so.13 and include/.
Usage: NV_ROOT=/tmp/nv/nvidia/cu13 nvrtc_check.py file.cu [-DNAME=VALUE ...]
"""
import ctypes, os, sys

root = os.environ.get("NV_ROOT", "/tmp/nv/nvidia/cu13")
lib = ctypes.CDLL(os.path.join(root, "lib", "libnvrtc.so.13"))
path = sys.argv[1]
src = open(path, "rb").read()
opts = [b"--gpu-architecture=sm_90", b"-I" + os.path.join(root, "include").encode(),
        b"--std=c++17", b"-default-device", b"-lineinfo"]
opts += [a.encode() for a in sys.argv[2:]]
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 0, None, None) == 0
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
text = log.value.decode(errors="replace").strip()
if text:
    print(text)
if rc != 0:
    print(f"{path}: NVRTC error {rc}")
    sys.exit(1)
if os.environ.get("CUBIN_OUT"):
    n = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    open(os.environ["CUBIN_OUT"], "wb").write(buf.raw)
print(f"{path}: ok")
