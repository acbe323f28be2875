"""Hostile checkpoint files: each is refused with one line naming the file, before any work.

Every file is built here, byte by byte (zipfile, struct, json, pickle opcodes), without torch.
"""

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from mm1_mlx.convert.torch_reader import CheckpointError, read_torch_checkpoint

# --- pickle opcodes, as torch.save writes a state dict (protocol 2) ---------------------------


def p_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def p_int(number: int) -> bytes:
    data = pickle.encode_long(number)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1: any size, any sign


def p_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def p_global(qualified: str) -> bytes:
    module, name = qualified.rsplit(".", 1)
    return b"c" + f"{module}\n{name}\n".encode()


def p_call(qualified: str, *args: bytes) -> bytes:
    return p_global(qualified) + p_tuple(*args) + b"R"


def p_tensor(size, stride, offset=0, numel=1, storage="torch.FloatStorage") -> bytes:
    persistent_id = p_tuple(p_str("storage"), p_global(storage), p_str("0"), p_str("cpu"))
    persistent_id = persistent_id[:-1] + p_int(numel) + b"tQ"  # BINPERSID
    return p_call(
        "torch._utils._rebuild_tensor_v2",
        persistent_id,
        p_int(offset),
        p_tuple(*map(p_int, size)),
        p_tuple(*map(p_int, stride)),
        b"\x89",  # requires_grad=False
        p_call("collections.OrderedDict"),
    )


def p_state_dict(**values: bytes) -> bytes:
    items = b"".join(p_str(key) + value for key, value in values.items())
    return b"\x80\x02}(" + items + b"u."


def torch_zip(path: Path, pickled: bytes, storage=b"\0" * 4, deflate_storage=False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        method = zipfile.ZIP_DEFLATED if deflate_storage else zipfile.ZIP_STORED
        archive.writestr("archive/data/0", storage, compress_type=method)
        archive.writestr("archive/version", "3\n")
    return path


def one_tensor_zip(path: Path, size, stride, **kwargs) -> Path:
    return torch_zip(path, p_state_dict(w=p_tensor(size, stride, **kwargs)))


# Where "version needed to extract", flags and compression method lie in each header.
ZIP_FIELDS = {"version": 0, "flags": 2, "method": 4}


def patch_zip_headers(path: Path, name: str, **fields: int) -> Path:
    """Sets fields (version, flags, method) of one entry, in both of its headers."""
    data = bytearray(path.read_bytes())
    # (signature, where the fields start, where the name's length is, where the name is)
    headers = ((b"PK\x03\x04", 4, 26, 30), (b"PK\x01\x02", 6, 28, 46))
    for signature, fields_at, length_at, name_at in headers:
        start = data.find(signature)
        while start >= 0:
            (length,) = struct.unpack_from("<H", data, start + length_at)
            if data[start + name_at : start + name_at + length] == name.encode():
                for field, value in fields.items():
                    struct.pack_into("<H", data, start + fields_at + ZIP_FIELDS[field], value)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))
    return path


def safetensors_file(path: Path, header, data: bytes = b"", raw: bytes | None = None) -> Path:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def good_safetensors(path: Path) -> Path:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    return safetensors_file(path, header, np.arange(2, dtype=np.float32).tobytes())


def index_file(folder: Path, weight_map, name="model.safetensors.index.json") -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def nested_json(depth: int) -> bytes:
    return b'{"w": ' + b"[" * depth + b"]" * depth + b"}"


# --- the hostile files: each builder returns the path to open -----------------------------------


def pickle_calls_os_system(tmp: Path) -> Path:
    payload = p_call("os.system", p_str(f"touch {tmp / 'pwned'}"))
    return torch_zip(tmp / "system.bin", p_state_dict(w=payload))


def pickle_stack_global_exec(tmp: Path) -> Path:
    code = p_str(f"open({str(tmp / 'pwned')!r}, 'w').close()")
    payload = p_str("builtins") + p_str("exec") + b"\x93" + p_tuple(code) + b"R"
    return torch_zip(tmp / "exec.bin", b"\x80\x04}(" + p_str("w") + payload + b"u.")


def pickle_inst_opcode(tmp: Path) -> Path:
    payload = b"(" + p_str(f"touch {tmp / 'pwned'}") + b"ios\nsystem\n"
    return torch_zip(tmp / "inst.bin", p_state_dict(w=payload))


def pickle_deep_nested_key(tmp: Path) -> Path:
    # A million nested tuples as a dict key: hashing it overflows the C stack.
    return torch_zip(tmp / "deep.bin", b"\x80\x02})" + b"\x85" * 1_000_000 + b"K\x01s.")


def pickle_shared_reference_bomb(tmp: Path) -> Path:
    # t[i+1] = (t[i], t[i]) through the memo: t[60] is 2**60 tuples, hashed as a dict key.
    doubling = b"".join(b"h%ch%c\x86q%c0" % (i, i, i + 1) for i in range(60))
    pickled = b"\x80\x02})q\x000" + doubling + b"h\x3cK\x01s."
    return torch_zip(tmp / "laughs.bin", pickled)


def zip_unknown_method(tmp: Path) -> Path:
    path = one_tensor_zip(tmp / "method.bin", (1,), (1,))
    return patch_zip_headers(path, "archive/data.pkl", method=99)


def zip_encrypted(tmp: Path) -> Path:
    # A stored entry is read straight from the file: its flags must still be heeded.
    path = one_tensor_zip(tmp / "locked.bin", (1,), (1,))
    return patch_zip_headers(path, "archive/data/0", flags=0x1)


def zip_future_version(tmp: Path) -> Path:
    path = one_tensor_zip(tmp / "future.bin", (1,), (1,))
    return patch_zip_headers(path, "archive/version", version=99)


def zip_storage_bomb(tmp: Path) -> Path:
    numel = 2 << 20  # 8 MiB of zeros deflate to ~8 KB
    pickled = p_state_dict(w=p_tensor((numel,), (1,), numel=numel))
    return torch_zip(tmp / "bomb.bin", pickled, b"\0" * 4 * numel, deflate_storage=True)


def zip_pickle_bomb(tmp: Path) -> Path:
    path = tmp / "pklbomb.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        # Unpickling stops at STOP: the zeros after it only inflate.
        archive.writestr("archive/data.pkl", p_state_dict() + b"\0" * (8 << 20))
        archive.writestr("archive/data/0", b"\0" * 4)
    return path


def zip_corrupt_deflate(tmp: Path) -> Path:
    data = np.random.default_rng(0).standard_normal(256).astype(np.float32).tobytes()
    pickled = p_state_dict(w=p_tensor((256,), (1,), numel=256))
    path = torch_zip(tmp / "garbled.bin", pickled, data, deflate_storage=True)
    with zipfile.ZipFile(path) as archive:
        entry = archive.getinfo("archive/data/0")
    raw = bytearray(path.read_bytes())
    start = entry.header_offset + 30 + len(entry.filename) + len(entry.extra)
    raw[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    return path


def zip_truncated(tmp: Path) -> Path:
    path = one_tensor_zip(tmp / "cut.bin", (1,), (1,))
    path.write_bytes(path.read_bytes()[:-30])
    return path


def zero_stride_4_tib(tmp: Path) -> Path:
    return one_tensor_zip(tmp / "stride0.bin", (1 << 20, 1 << 20), (0, 0))


def zero_stride_gigabytes(tmp: Path) -> Path:
    return one_tensor_zip(tmp / "stride0_gb.bin", (40_000, 40_000), (0, 0))


def shape_product_overflow(tmp: Path) -> Path:
    return one_tensor_zip(tmp / "overflow.bin", (1 << 63, 1 << 63, 4), (0, 0, 0))


def empty_shape_too_large_for_numpy(tmp: Path) -> Path:
    return one_tensor_zip(tmp / "empty_huge.bin", (0, 1 << 62, 1 << 62), (0, 0, 0))


def negative_dimension(tmp: Path) -> Path:
    return one_tensor_zip(tmp / "negative.bin", (-1, 4), (4, 1))


def shape_beyond_storage(tmp: Path) -> Path:
    return one_tensor_zip(tmp / "beyond.bin", (4, 4), (4, 1))


def too_many_dimensions(tmp: Path) -> Path:
    return one_tensor_zip(tmp / "ndim.bin", (1,) * 33, (1,) * 33)


def many_views_of_one_storage(tmp: Path) -> Path:
    numel = 1 << 20  # 4 MiB stored, read out 40 times over by 40 tensors
    views = {f"w{i}": p_tensor((numel,), (1,), numel=numel) for i in range(40)}
    return torch_zip(tmp / "views.bin", p_state_dict(**views), b"\0" * 4 * numel)


def safetensors_deep_header(tmp: Path) -> Path:
    return safetensors_file(tmp / "deep.safetensors", None, raw=nested_json(100_000))


def safetensors_deep_object_header(tmp: Path) -> Path:
    raw = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
    return safetensors_file(tmp / "deepobj.safetensors", None, raw=raw)


def safetensors_huge_integer(tmp: Path) -> Path:
    raw = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    return safetensors_file(tmp / "digits.safetensors", None, raw=raw)


def safetensors_header_length_past_end(tmp: Path) -> Path:
    path = tmp / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 63) + b'{"w": 1}')
    return path


def safetensors_bad_utf8(tmp: Path) -> Path:
    return safetensors_file(tmp / "utf8.safetensors", None, raw=b'{"\xff\xfe": 1}')


def safetensors_dtype_not_a_string(tmp: Path) -> Path:
    header = {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}
    return safetensors_file(tmp / "dtype.safetensors", header, b"\0" * 4)


def safetensors_negative_dimension(tmp: Path) -> Path:
    header = {"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}
    return safetensors_file(tmp / "negative.safetensors", header, b"\0" * 16)


def safetensors_shape_as_string(tmp: Path) -> Path:
    header = {"w": {"dtype": "U8", "shape": "1234", "data_offsets": [0, 4]}}
    return safetensors_file(tmp / "strshape.safetensors", header, b"\0" * 4)


def safetensors_shape_beyond_data(tmp: Path) -> Path:
    header = {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}
    return safetensors_file(tmp / "beyond.safetensors", header, b"\0" * 4)


def safetensors_empty_but_huge(tmp: Path) -> Path:
    header = {"w": {"dtype": "F32", "shape": [0, 1 << 62, 1 << 62], "data_offsets": [0, 0]}}
    return safetensors_file(tmp / "empty_huge.safetensors", header)


def safetensors_overlapping_views(tmp: Path) -> Path:
    size = 1 << 20
    header = {
        f"w{i}": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]} for i in range(80)
    }
    return safetensors_file(tmp / "overlap.safetensors", header, b"\0" * size)


def index_names_itself(tmp: Path) -> Path:
    return index_file(tmp / "self", {"w": "model.safetensors.index.json"})


def index_cycle(tmp: Path) -> Path:
    index_file(tmp / "cycle", {"w": "a.index.json"}, name="b.index.json")
    return index_file(tmp / "cycle", {"w": "b.index.json"}, name="a.index.json")


def index_absolute_shard(tmp: Path) -> Path:
    return index_file(tmp / "absolute", {"w": str(good_safetensors(tmp / "elsewhere.st"))})


def index_parent_shard(tmp: Path) -> Path:
    return index_file(tmp / "parent", {"w": "../../etc/passwd"})


def index_symlink_escape(tmp: Path) -> Path:
    index = index_file(tmp / "linked", {"w": "model.safetensors"})
    (index.parent / "model.safetensors").symlink_to(good_safetensors(tmp / "outside.st"))
    return index


def index_shard_with_nul(tmp: Path) -> Path:
    return index_file(tmp / "nul", {"w": "model\0.safetensors"})


def index_shard_not_a_string(tmp: Path) -> Path:
    return index_file(tmp / "number", {"w": 5})


def index_deep_json(tmp: Path) -> Path:
    path = tmp / "deep.index.json"
    path.write_bytes(nested_json(100_000))
    return path


def index_weight_map_a_list(tmp: Path) -> Path:
    return index_file(tmp / "list", ["model.safetensors"])


CASES = [
    ("pickle calls os.system", pickle_calls_os_system, "refusing to unpickle global 'os.system'"),
    ("pickle STACK_GLOBAL exec", pickle_stack_global_exec, "global 'builtins.exec'"),
    ("pickle INST os.system", pickle_inst_opcode, "global 'os.system'"),
    ("pickle key nested 1e6 deep", pickle_deep_nested_key, "nests objects over 100 deep"),
    ("pickle shared-reference bomb", pickle_shared_reference_bomb, "far larger than its"),
    ("zip unknown compression", zip_unknown_method, "compression method 99"),
    ("zip encrypted entry", zip_encrypted, "'archive/data/0' is encrypted"),
    ("zip version 9.9 to extract", zip_future_version, "zip file version 9.9"),
    ("zip bomb storage", zip_storage_bomb, "'archive/data/0' would inflate"),
    ("zip bomb data.pkl", zip_pickle_bomb, "'archive/data.pkl' would inflate"),
    ("zip corrupt deflate data", zip_corrupt_deflate, "corrupt compressed storage"),
    ("zip truncated", zip_truncated, "truncated or corrupt zip"),
    ("stride 0, 4 TiB", zero_stride_4_tib, "would read out to 4398046511104 bytes"),
    ("stride 0, 6 GB", zero_stride_gigabytes, "would read out to 6400000000 bytes"),
    ("shape product overflow", shape_product_overflow, "would read out to"),
    ("empty shape numpy refuses", empty_shape_too_large_for_numpy, "would read out to"),
    ("negative dimension", negative_dimension, "malformed tensor record"),
    ("shape beyond storage", shape_beyond_storage, "needs 16 elements of a storage that holds 1"),
    ("33 dimensions", too_many_dimensions, "33 dimensions (at most 32)"),
    ("40 views of one storage", many_views_of_one_storage, "'w32' of shape (1048576,)"),
    ("safetensors 1e5-deep array", safetensors_deep_header, "nested too deeply"),
    ("safetensors 1e5-deep object", safetensors_deep_object_header, "nested too deeply"),
    ("safetensors 5000-digit int", safetensors_huge_integer, "corrupt safetensors header"),
    ("safetensors header length", safetensors_header_length_past_end, "header past end of file"),
    ("safetensors bad utf-8", safetensors_bad_utf8, "corrupt safetensors header"),
    ("safetensors dtype a list", safetensors_dtype_not_a_string, "unsupported dtype"),
    ("safetensors negative dims", safetensors_negative_dimension, "corrupt safetensors entry"),
    ("safetensors shape a string", safetensors_shape_as_string, "shape not a list"),
    ("safetensors shape beyond data", safetensors_shape_beyond_data, "has 4 bytes for shape"),
    ("safetensors empty, huge", safetensors_empty_but_huge, "would read out to"),
    ("safetensors overlapping", safetensors_overlapping_views, "more than this"),
    ("index names itself", index_names_itself, "is an index, not a weights file"),
    ("index cycle", index_cycle, "'b.index.json' is an index"),
    ("index absolute shard", index_absolute_shard, "points outside the checkpoint's folder"),
    ("index ../../etc/passwd", index_parent_shard, "'../../etc/passwd' points outside"),
    ("index symlink escape", index_symlink_escape, "links outside the checkpoint's folder"),
    ("index shard with NUL", index_shard_with_nul, "is not a file name"),
    ("index shard a number", index_shard_not_a_string, "a shard is not a file name"),
    ("index 1e5-deep JSON", index_deep_json, "nested too deeply"),
    ("index weight_map a list", index_weight_map_a_list, "no JSON 'weight_map'"),
]


@pytest.mark.parametrize("build, fragment", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_is_one_line_error_naming_it(tmp_path, build, fragment):
    path = build(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        read_torch_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert str(path) in message and fragment in message, message
    assert not (tmp_path / "pwned").exists()


def test_the_builders_make_readable_files_when_honest(tmp_path):
    """The hostile files differ from these only in what each case breaks."""
    values = np.arange(3, dtype=np.float32)
    pickled = p_state_dict(
        w=p_tensor((3,), (1,), numel=3),
        expanded=p_tensor((4, 3), (0, 1), numel=3),
        empty=p_tensor((0, 5), (5, 1), numel=3),
    )
    for deflate in (False, True):
        path = torch_zip(tmp_path / f"ok{deflate}.bin", pickled, values.tobytes(), deflate)
        tensors = read_torch_checkpoint(path)
        assert np.array_equal(tensors["w"], values)
        assert np.array_equal(tensors["expanded"], np.tile(values, (4, 1)))
        assert tensors["empty"].shape == (0, 5)
    assert np.array_equal(read_torch_checkpoint(good_safetensors(tmp_path / "ok.st"))["w"], [0, 1])


def test_hub_cache_shards_link_into_its_blobs(tmp_path):
    """The hub cache keeps files in blobs/ and links snapshots/<revision>/ to them."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (snapshot / "model-1.safetensors").symlink_to(good_safetensors(blobs / "f00d"))
    index = index_file(blobs, {"w": "model-1.safetensors"}, name="beef")
    (snapshot / "model.safetensors.index.json").symlink_to(index)
    assert np.array_equal(read_torch_checkpoint(snapshot)["w"], [0, 1])


@pytest.mark.parametrize(
    "build, fragment",
    [(zero_stride_4_tib, "would read out to"), (index_cycle, "is an index")],
)
def test_convert_refuses_a_hostile_vision_checkpoint(tmp_path, build, fragment):
    path = build(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(
        "convert", "--vision", str(path), "--llm", str(tmp_path), "--out", str(out)
    )
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not out.exists()
