"""models/gguf_reader.py: the same fields and tensors as gguf's own reader, on a GGUF written here."""
import os

import gguf
import numpy as np
import pytest

from dspark_trt.models.gguf_reader import open_gguf


def test_open_gguf_reads_what_ggufs_reader_reads(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_token_list([f"tok{i}" for i in range(300)])  # a string array, as a vocabulary is
    writer.add_array("tokenizer.ggml.token_type", [1] * 300)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((300, 32)).astype(np.float32))
    raw = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, theirs = open_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(theirs.fields) and "tokenizer.ggml.tokens" in ours.fields
    for name, field in ours.fields.items():
        other = theirs.fields[name]
        assert (field.offset, field.types, field.data) == (other.offset, other.types, other.data)
        assert all(np.array_equal(a, b) for a, b in zip(field.parts, other.parts, strict=True))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for tensor, other in zip(ours.tensors, theirs.tensors):
        assert tensor.tensor_type == other.tensor_type and list(tensor.shape) == list(other.shape)
        assert np.array_equal(tensor.data, other.data) and type(tensor.data) is np.ndarray  # no memmap slices


def test_open_gguf_parses_an_unchanged_file_once(tmp_path):
    path = tmp_path / "tiny.gguf"

    def write(value):
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()

    write(2)
    first = open_gguf(path)
    assert open_gguf(str(path)) is first
    with pytest.raises(ValueError):  # read-only: no reader can change what the next one sees
        first.data[0] = 0
    write(3)  # rewritten: parsed again
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = open_gguf(path)
    assert second is not first and int(second.fields["llama.block_count"].parts[-1][0]) == 3
