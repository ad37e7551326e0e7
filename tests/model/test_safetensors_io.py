"""Our safetensors reader/writer against the reference `safetensors` package, and malformed files."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch as st
import torch

from minicodeparrot.errors import UserError
from minicodeparrot.model.safetensors_io import load_file, load_metadata, save_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(-4, 5, dtype=torch.int64).reshape(3, 3),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "u8": torch.arange(11, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f64": torch.tensor([1.5, -2.25], dtype=torch.float64),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_we_write_reference_reads(tmp_path):
    save_file(_tensors(), tmp_path / "a.safetensors", metadata={"format": "pt", "step": 3})
    _assert_same(st.load_file(tmp_path / "a.safetensors"), _tensors())
    from safetensors import safe_open

    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}


def test_reference_writes_we_read(tmp_path):
    st.save_file(_tensors(), tmp_path / "b.safetensors", metadata={"format": "pt"})
    _assert_same(load_file(tmp_path / "b.safetensors"), _tensors())
    assert load_metadata(tmp_path / "b.safetensors") == {"format": "pt"}


def test_non_contiguous_input_and_layout(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    save_file({"t": t}, tmp_path / "c.safetensors")
    raw = (tmp_path / "c.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0  # data buffer aligned
    assert raw[8 + n:] == t.contiguous().numpy().tobytes()  # raw little-endian, row-major
    assert torch.equal(load_file(tmp_path / "c.safetensors")["t"], t)


def _write(path, header: dict, data: bytes, length: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


F32_4 = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    "header,data,length,match",
    [
        (F32_4, b"\0" * 8, None, "outside"),  # data truncated
        (F32_4, b"\0" * 16, 10**9, "exceeds"),  # header length beyond the bound
        (F32_4, b"\0" * 16, 5000, "runs past the end"),  # header length beyond the file
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, None, "expected 0"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}, b"\0" * 16, None, "outside"),
        ({"x": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16, None, "needs 20 bytes"),
        ({"x": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "unknown dtype"),
        (F32_4, b"\0" * 20, None, "cover 16 bytes"),  # trailing garbage
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
)
def test_malformed_files_are_refused(tmp_path, header, data, length, match):
    path = _write(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(UserError, match=match):
        load_file(path)


def test_not_json_and_tiny_files(tmp_path):
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(UserError, match="shorter than"):
        load_file(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(UserError, match="not JSON"):
        load_file(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_file(tmp_path / "missing.safetensors")


def test_truncated_real_file(tmp_path):
    st.save_file(_tensors(), tmp_path / "full.safetensors")
    raw = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(UserError, match="truncated"):
        load_file(tmp_path / "cut.safetensors")
