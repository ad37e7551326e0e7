"""Read and write the safetensors format ourselves (the checkpoint format of Hugging Face models).

A file is: 8 bytes little-endian u64 N, then N bytes of JSON header, then one flat byte buffer.
The header maps each tensor name to {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}
(offsets relative to the start of the buffer), plus an optional "__metadata__" of string -> string.
Tensor bytes are raw little-endian, row-major. Unlike a pickle, nothing in the file is executed,
which is why it is safe to load files from strangers -- provided the reader checks every offset,
which is what `read_header` does before a single tensor is touched.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import torch

from minicodeparrot.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Tensor bytes are copied as they lie in memory, which matches the file's little-endian order only here.
assert sys.byteorder == "little", "safetensors_io supports little-endian machines only"
MAX_HEADER_SIZE = 100_000_000  # the reference implementation's bound; a larger "length" is a corrupt file


class SafetensorsError(UserError):
    """A file that is not valid safetensors (truncated, corrupt, or not safetensors at all)."""


def read_header(f, path: object, file_size: int) -> tuple[dict, dict[str, str], int]:
    """Validate the header of an open file: (tensor entries, metadata, byte offset of the data buffer)."""
    def bad(msg: str) -> SafetensorsError:
        return SafetensorsError(f"{path} is not a valid safetensors file: {msg}; re-download or re-save it")

    if file_size < 8:
        raise bad(f"only {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_SIZE:
        raise bad(f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if 8 + n > file_size:
        raise bad(f"header of {n} bytes runs past the end of the {file_size}-byte file (truncated?)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data_start, data_size = 8 + n, file_size - 8 - n
    entries = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} needs exactly dtype, shape and data_offsets")
        if e["dtype"] not in DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {e['dtype']!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {name!r} offsets {offsets} lie outside the {data_size}-byte data (truncated?)")
        itemsize = DTYPES[e["dtype"]].itemsize
        if math.prod(shape) * itemsize != end - begin:
            need, span = math.prod(shape) * itemsize, end - begin
            raise bad(f"tensor {name!r}: shape {shape} of {e['dtype']} needs {need} bytes, not {span}")
        entries.append((begin, end, name))
    # The tensors must tile the buffer exactly: no gaps, no overlaps (overlaps could alias tensors).
    pos = 0
    for begin, end, name in sorted(entries):
        if begin != pos:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_size:
        raise bad(f"tensors cover {pos} bytes but the data buffer has {data_size}")
    return header, metadata, data_start


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the path of a .safetensors file")
    with open(path, "rb") as f:
        header, _, data_start = read_header(f, path, path.stat().st_size)
        tensors = {}
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = e["data_offsets"]
            dtype = DTYPES[e["dtype"]]
            if end == begin:
                tensors[name] = torch.empty(e["shape"], dtype=dtype)
                continue
            # One fresh buffer per tensor: correctly aligned, and never more than one tensor in flight twice.
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise SafetensorsError(f"{path}: tensor {name!r} is cut short (truncated); re-download it")
            t = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(e["shape"])
            tensors[name] = t
    return tensors


def load_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    with open(path, "rb") as f:
        return read_header(f, path, path.stat().st_size)[1]


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (copied to CPU, contiguous) so that `safetensors` and `transformers` can read them."""
    # Largest itemsize first keeps every tensor aligned to its own itemsize, as the reference writer does.
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise UserError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = dict(dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), data_offsets=[pos, pos + nbytes])
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data buffer starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            t = t.detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    tmp.replace(path)  # a crash mid-write never leaves a half-written checkpoint under the real name
