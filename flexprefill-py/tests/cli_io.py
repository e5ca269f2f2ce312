"""The Rust CLI (`flexprefill run`) on the same tensors as a Python call: a minimal safetensors
writer/reader (raw little-endian bytes; bfloat16 travels as its uint16 bits) and the binary's
location. No dependency beyond NumPy."""

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

_CODES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def find_cli():
    """`$FLEXPREFILL_CLI`, else the newer of the workspace's release and debug builds (`cargo
    test --workspace` builds the debug one), else `flexprefill` on PATH; None when there is
    none."""
    env = os.environ.get("FLEXPREFILL_CLI")
    if env:
        return env if Path(env).is_file() else None
    root = Path(__file__).resolve().parents[2]
    built = [p for p in (root / "target/release/flexprefill", root / "target/debug/flexprefill")
             if p.is_file()]
    if built:
        return str(max(built, key=lambda p: p.stat().st_mtime))
    return shutil.which("flexprefill")


def write(path, tensors):
    """tensors: name -> (dtype code, NumPy array of the bits: float32, float16 or uint16)."""
    header, blobs, offset = {}, [], 0
    for name, (code, arr) in tensors.items():
        data = np.ascontiguousarray(arr, dtype=_CODES[code]).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, sort_keys=True).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read(path, name):
    """(dtype code, array of the bits) of tensor `name`."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    t = header[name]
    a, b = t["data_offsets"]
    arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=_CODES[t["dtype"]])
    return t["dtype"], arr.reshape(t["shape"])


def run(cli, tmp_path, tensors, backend, extra=()):
    """Writes q, k, v, runs `flexprefill run --backend BACKEND`, returns (code, bits) of `o`."""
    src, dst = tmp_path / "qkv.safetensors", tmp_path / "o.safetensors"
    write(src, tensors)
    cmd = [cli, "run", "--input", str(src), "--backend", backend, "--output", str(dst), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return read(dst, "o")
