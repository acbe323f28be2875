"""mm1_mlx.convert.torch_reader against checkpoints written by torch itself."""

import builtins
import collections
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mm1_mlx.convert.torch_reader import (
    CheckpointError,
    TensorRef,
    open_checkpoint,
    read_torch_checkpoint,
)

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, 100, shape, dtype=dtype)


def assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        want = as_numpy(tensor)
        got = actual[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert np.array_equal(got, want), key
        assert got.flags.c_contiguous, key


def saved(tmp_path: Path, obj, name="model.bin", **kwargs) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def rewrite_zip(src: Path, dst: Path, transform=lambda name, data: data, compression=0) -> Path:
    """Copy a zip entry by entry; `transform` returns new bytes, or None to drop the entry."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
        for name in old.namelist():
            data = transform(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return dst


def write_torch_zip(path: Path, pickled: bytes) -> Path:
    """A zip with torch.save's layout around an arbitrary data.pkl."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", b"\0" * 16)
        archive.writestr("archive/version", "3\n")
    return path


def one_line_error(path, fragment: str) -> str:
    with pytest.raises(CheckpointError) as caught:
        read_torch_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert fragment in message, message
    return message


# --- zip-pickle checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
def test_every_dtype(tmp_path, protocol):
    tensors = {str(dtype).removeprefix("torch."): sample(dtype) for dtype in ALL_DTYPES}
    path = saved(tmp_path, tensors, pickle_protocol=protocol)
    assert_same(read_torch_checkpoint(path), tensors)
    refs = open_checkpoint(path)
    assert all(ref.dtype == key for key, ref in refs.items())
    assert all(ref.shape == (3, 5) for ref in refs.values())


def test_shared_storage_and_strided_views(tmp_path):
    w = torch.randn(6, 4)
    tensors = {
        "w": w,
        "tail": w[2:],
        "transposed": w.t(),
        "every_other_row": w[::2],
        "every_other_column": w[:, 1::2],
        "element": w[3, 1],
        "expanded": torch.arange(3.0).expand(4, 3),
        "bf16_transposed": torch.randn(3, 5, dtype=torch.bfloat16).t(),
    }
    path = saved(tmp_path, tensors)
    with zipfile.ZipFile(path) as archive:
        storages = [n for n in archive.namelist() if "/data/" in n]
    assert len(storages) == 3  # w and its views share one storage
    assert_same(read_torch_checkpoint(path), tensors)


def test_parameters_module_state_dict_and_tensor_attributes(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    state = module.state_dict()
    assert hasattr(state, "_metadata")
    tagged = torch.ones(2)
    tagged.note = "saved through _rebuild_from_type_v2"
    tensors = {
        **state,
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "frozen": torch.nn.Parameter(torch.randn(3), requires_grad=False),
        "tagged": tagged,
    }
    assert_same(read_torch_checkpoint(saved(tmp_path, tensors)), tensors)


def test_zero_dim_and_empty_tensors(tmp_path):
    tensors = {
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7),
        "bf16_scalar": torch.tensor(1.25, dtype=torch.bfloat16),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(0, 3, dtype=torch.float16),
    }
    path = saved(tmp_path, tensors)
    assert_same(read_torch_checkpoint(path), tensors)
    assert open_checkpoint(path)["scalar"].mlx().item() == 2.5


def test_nested_state_dict(tmp_path):
    state = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    path = saved(tmp_path, {"state_dict": state, "epoch": 3, "name": "run"})
    assert_same(read_torch_checkpoint(path), state)
    path = saved(tmp_path, {"model": state, "step": 10}, name="ckpt.pt")
    assert_same(read_torch_checkpoint(path), state)
    path = saved(tmp_path, {"model": state, "state_dict": state}, name="two.pt")
    one_line_error(path, "several state dicts")
    one_line_error(saved(tmp_path, {"epoch": 1}, name="none.pt"), "holds no tensors")


def test_mlx_arrays(tmp_path):
    tensors = {
        "bf16": sample(torch.bfloat16),
        "f16": sample(torch.float16),
        "b": sample(torch.bool),
    }
    refs = open_checkpoint(saved(tmp_path, tensors))
    bf16 = refs["bf16"].mlx()
    assert bf16.dtype == mx.bfloat16 and bf16.shape == (3, 5)
    bits = tensors["bf16"].view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(np.array(bf16.view(mx.uint16)), bits)
    as_f32 = refs["bf16"].mlx(mx.float32)
    assert as_f32.dtype == mx.float32
    assert np.array_equal(np.array(as_f32), as_numpy(tensors["bf16"]))
    assert refs["f16"].mlx().dtype == mx.float16
    assert np.array_equal(np.array(refs["b"].mlx()), tensors["b"].numpy())
    assert np.array_equal(np.asarray(refs["f16"]), tensors["f16"].numpy())
    assert np.asarray(refs["f16"], dtype=np.float32).dtype == np.float32
    assert isinstance(refs["f16"], TensorRef) and "float16" in repr(refs["f16"])


def test_big_endian_and_compressed_zips(tmp_path):
    tensors = {
        "w": torch.randn(4, 3),
        "h": torch.randn(5, dtype=torch.bfloat16),
    }
    tensors["w_t"] = tensors["w"].t()
    path = saved(tmp_path, tensors, name="x.pt")
    itemsizes = {"x/data/0": "4", "x/data/1": "2"}

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if name in itemsizes:
            return (
                np.frombuffer(data, "<u" + itemsizes[name]).astype(">u" + itemsizes[name]).tobytes()
            )
        return data

    big = rewrite_zip(path, tmp_path / "big.pt", to_big_endian)
    assert_same(read_torch_checkpoint(big), tensors)
    deflated = rewrite_zip(path, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    assert_same(read_torch_checkpoint(deflated), tensors)


def test_content_is_sniffed_not_the_extension(tmp_path):
    tensors = {"w": torch.randn(2, 2)}
    torch_file = saved(tmp_path, tensors, name="weights.data")
    safetensors_file = tmp_path / "weights.ckpt"
    save_file(tensors, safetensors_file)
    assert_same(read_torch_checkpoint(torch_file), tensors)
    assert_same(read_torch_checkpoint(safetensors_file), tensors)


def test_reading_does_not_import_torch(tmp_path):
    path = saved(tmp_path, {"w": torch.randn(2, 2, dtype=torch.bfloat16)})
    code = (
        "import sys\n"
        "from mm1_mlx.convert.torch_reader import read_torch_checkpoint\n"
        f"read_torch_checkpoint({str(path)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- untrusted pickles ------------------------------------------------------------------------


class CallOnLoad:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(
    "function, argument",
    [(os.system, "touch {marker}"), (builtins.exec, "open({marker!r}, 'w').close()")],
)
def test_malicious_pickle_is_refused_and_not_run(tmp_path, function, argument):
    marker = str(tmp_path / "pwned")
    payload = CallOnLoad(function, argument.format(marker=marker))
    pickled = pickle.dumps({"w": payload}, protocol=2)
    path = write_torch_zip(tmp_path / "model.bin", pickled)
    message = one_line_error(path, "refusing to unpickle global")
    assert "model.bin" in message and function.__name__ in message
    assert not os.path.exists(marker)


def test_pickled_module_is_refused(tmp_path):
    path = saved(tmp_path, torch.nn.Linear(2, 2), name="whole_model.pt")
    one_line_error(path, "torch.nn.modules.linear.Linear")


@pytest.mark.parametrize(
    "qualified",
    ["torch.FloatStorage", "collections.OrderedDict", "torch._utils._rebuild_tensor_v2"],
)
def test_pickle_cannot_modify_the_allowed_globals(tmp_path, qualified):
    module, name = qualified.rsplit(".", 1)
    state = pickle.dumps((None, {"dtype": "int8", "function": 0}), protocol=2)[2:-1]
    pickled = b"\x80\x02c" + f"{module}\n{name}\n".encode() + state + b"b."  # BUILD on the global
    one_line_error(write_torch_zip(tmp_path / "build.bin", pickled), "build.bin")
    tensors = {"w": torch.randn(3), "d": torch.ones(2, dtype=torch.int32)}
    assert_same(read_torch_checkpoint(saved(tmp_path, tensors)), tensors)


# --- safetensors, shards, folders -------------------------------------------------------------


def test_safetensors(tmp_path):
    tensors = {
        dtype_name: sample(dtype)
        for dtype_name, dtype in [
            ("bf16", torch.bfloat16),
            ("f32", torch.float32),
            ("i64", torch.int64),
            ("bool", torch.bool),
        ]
    }
    tensors["scalar"] = torch.tensor(3.0)
    tensors["empty"] = torch.empty(0, 2)
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    actual = read_torch_checkpoint(path)
    assert sorted(actual) == sorted(tensors)
    assert_same({k: actual[k] for k in tensors}, tensors)
    assert open_checkpoint(path)["bf16"].mlx().dtype == mx.bfloat16


def write_shards(folder: Path, tensors: dict, kind: str) -> Path:
    """Two shards and an index in the layout transformers writes."""
    folder.mkdir(exist_ok=True)
    keys = list(tensors)
    suffix = "safetensors" if kind == "safetensors" else "bin"
    weight_map = {}
    for number, part in enumerate([keys[:2], keys[2:]], start=1):
        name = f"model-0000{number}-of-00002.{suffix}"
        shard = {key: tensors[key] for key in part}
        if kind == "safetensors":
            save_file(shard, folder / name)
        else:
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = folder / (
        "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    )
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_checkpoint(tmp_path, kind):
    tensors = {f"layer{i}.weight": torch.randn(3, 2, dtype=torch.bfloat16) for i in range(4)}
    index = write_shards(tmp_path / "model", tensors, kind)
    assert_same(read_torch_checkpoint(index), tensors)
    assert_same(read_torch_checkpoint(index.parent), tensors)


def test_folder_discovery(tmp_path):
    tensors = {"w": torch.randn(2)}
    other = {"v": torch.randn(3)}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(tensors, hf / "model.safetensors")
    torch.save(other, hf / "pytorch_model.bin")
    torch.save(other, hf / "training_args.bin")
    assert_same(read_torch_checkpoint(hf), tensors)

    single = tmp_path / "single"
    single.mkdir()
    torch.save(tensors, single / "epoch_32.pt")
    (single / "notes.txt").write_text("hello")
    assert_same(read_torch_checkpoint(single), tensors)

    save_file(other, single / "other.safetensors")  # safetensors wins over .pt
    assert_same(read_torch_checkpoint(single), other)
    save_file(other, single / "third.safetensors")
    message = one_line_error(single, "several checkpoints")
    assert "other.safetensors" in message and "third.safetensors" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(empty, "no checkpoint")


# --- bad inputs ---------------------------------------------------------------------------------


def real_bin(tmp_path) -> Path:
    return saved(tmp_path, {"w": torch.randn(64, 64), "b": torch.randn(64)}, name="real.bin")


def missing_file(tmp_path):
    return tmp_path / "absent.bin", "no such file"


def text_file(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_text("not a checkpoint\n")
    return path, "unknown format"


def empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    return path, "empty file"


def legacy_torch(tmp_path):
    path = saved(tmp_path, {"w": torch.ones(2)}, "old.pt", _use_new_zipfile_serialization=False)
    return path, "legacy (pre-1.6, non-zip) PyTorch format"


def truncated_zip(tmp_path):
    data = real_bin(tmp_path).read_bytes()
    path = tmp_path / "half.bin"
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated or corrupt zip"


def zip_without_pickle(tmp_path):
    path = tmp_path / "images.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/readme.txt", "hi")
    return path, "without data.pkl"


def missing_storage(tmp_path):
    drop = lambda name, data: None if name.endswith("/data/0") else data  # noqa: E731
    return rewrite_zip(real_bin(tmp_path), tmp_path / "nostorage.bin", drop), "data/0' is missing"


def short_storage(tmp_path):
    cut = lambda name, data: data[:100] if name.endswith("/data/0") else data  # noqa: E731
    return rewrite_zip(real_bin(tmp_path), tmp_path / "short.bin", cut), "holds 100 bytes"


class Storage:
    pass


class FakeTensor:
    """Pickles as torch.save pickles a tensor of `size`/`stride` in the first storage."""

    def __init__(self, size, stride):
        self.size, self.stride = size, stride

    def __reduce__(self):
        args = (Storage(), 0, self.size, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


def torch_like_zip(path: Path, tensor: FakeTensor, storage_class, numel: int) -> Path:
    class TorchLikePickler(pickle.Pickler):
        def persistent_id(self, obj):
            return (
                ("storage", storage_class, "0", "cpu", numel) if isinstance(obj, Storage) else None
            )

    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2).dump({"w": tensor})
    return write_torch_zip(path, buffer.getvalue())


def tensor_past_storage(tmp_path):
    path = torch_like_zip(tmp_path / "liar.bin", FakeTensor((4, 4), (4, 1)), torch.FloatStorage, 4)
    return path, "'w' needs 16 elements of a storage that holds 4"


def unsupported_storage(tmp_path):
    path = tmp_path / "complex.bin"
    torch_like_zip(path, FakeTensor((2,), (1,)), torch.ComplexFloatStorage, 2)
    return path, "unsupported tensor type 'torch.ComplexFloatStorage'"


def truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(32, 32)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    return path, "truncated safetensors"


def missing_shard(tmp_path):
    index = write_shards(tmp_path / "shards", {f"k{i}": torch.ones(1) for i in range(4)}, "bin")
    (index.parent / "model-00002-of-00002.bin").unlink()
    return index, "model-00002-of-00002.bin' is missing"


def key_in_two_shards(tmp_path):
    index = write_shards(
        tmp_path / "dup", {f"k{i}": torch.ones(1) for i in range(4)}, "safetensors"
    )
    save_file(
        {"k2": torch.ones(1), "k0": torch.ones(1)},
        index.parent / "model-00002-of-00002.safetensors",
    )
    return index, "'k0' is in two shards"


def key_not_in_its_shard(tmp_path):
    index = write_shards(tmp_path / "ghost", {f"k{i}": torch.ones(1) for i in range(4)}, "bin")
    index_data = json.loads(index.read_text())
    index_data["weight_map"]["ghost"] = "model-00001-of-00002.bin"
    index.write_text(json.dumps(index_data))
    return index, "'ghost' is not in its shard 'model-00001-of-00002.bin'"


def index_without_weight_map(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    return index, "not a checkpoint index"


@pytest.mark.parametrize(
    "make_bad_input",
    [
        missing_file,
        text_file,
        empty_file,
        legacy_torch,
        truncated_zip,
        zip_without_pickle,
        missing_storage,
        short_storage,
        tensor_past_storage,
        unsupported_storage,
        truncated_safetensors,
        missing_shard,
        key_in_two_shards,
        key_not_in_its_shard,
        index_without_weight_map,
    ],
)
def test_bad_input_is_one_line_error_naming_the_file(tmp_path, make_bad_input):
    path, fragment = make_bad_input(tmp_path)
    message = one_line_error(path, fragment)
    assert path.name in message


# --- memory -------------------------------------------------------------------------------------


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


@pytest.mark.slow
def test_opening_reads_nothing_and_reading_holds_one_copy(tmp_path):
    size = 50_000_000  # 200 MB of float32
    big = torch.arange(size, dtype=torch.float32)
    path = saved(tmp_path, {"big": big, "small": torch.ones(3)})
    del big
    before = resident_mb()
    refs = open_checkpoint(path)
    assert resident_mb() - before < 20
    array = refs["big"].numpy()
    grown = resident_mb() - before
    assert 150 < grown < 260, grown  # the array itself, not the array plus the file's pages
    assert array[-1] == size - 1 and array[12345] == 12345
