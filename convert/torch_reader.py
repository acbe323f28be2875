"""Read PyTorch checkpoints without torch: zip-pickle files, safetensors, sharded indexes, folders.

`open_checkpoint` returns lazy `TensorRef`s: opening a checkpoint reads only its metadata, and
each tensor's bytes are read from the file when `.numpy()` or `.mlx()` asks for them, straight
into the array returned, so converting a large checkpoint holds about one copy of it at most.

The pickle inside a PyTorch zip is untrusted: the unpickler resolves only the few globals a
tensor state dict uses, to inert stand-ins defined here, and refuses every other global. Nothing
the pickle names is imported or called.

Every file is untrusted in size too: what reading a file may produce is bounded by the file's own
size (zip entries that inflate far beyond their compressed bytes, tensors that repeat one stored
element over a huge shape are refused when the checkpoint is opened), and a sharded index may
only name weights files inside its own folder.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mm1_mlx.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the one-line message names the file (and the key)."""


# bfloat16 is kept as its uint16 bits until the end: numpy has no bfloat16.
_NUMPY_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# torch.save before 1.6 wrote a bare pickle that starts with this magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_FOLDER_PREFERENCE = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
# Otherwise the first of these groups that matches anything must match exactly one file.
_FOLDER_FALLBACKS = (("*.index.json",), ("*.safetensors",), ("*.bin", "*.pt", "*.pth"))


# What reading one file may produce: at most this many times its size, or the allowance,
# whichever is more. Real weights deflate to ~90% and tensors rarely share storages, so only a
# crafted file (a zip bomb, a huge shape over one element through stride 0) comes near it.
_MAX_GROWTH = 32
_GROWTH_ALLOWANCE = 64 << 20
# A compressed zip entry may inflate up to _MAX_GROWTH times, or to this size whatever its ratio
# (a small all-zero tensor deflates ~1000x).
_INFLATE_ALLOWANCE = 1 << 20
# safetensors' own limit on its JSON header; also the most an index or a data.pkl may take.
_MAX_METADATA_BYTES = 100_000_000
# A state dict's pickle nests a few levels; hashing a deeply nested key overflows the C stack.
_MAX_PICKLE_DEPTH = 100
_MAX_DIMENSIONS = 32  # the most numpy before 2.0 allows an array
# What zipfile raises on a corrupt archive: a bad central directory, bad deflate data, a CRC,
# a version it cannot extract.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    struct.error,
    ValueError,
    OverflowError,
    NotImplementedError,
)


def _growth_limit(file_size: int) -> int:
    return max(_MAX_GROWTH * file_size, _GROWTH_ALLOWANCE)


def _itemsize(dtype: str) -> int:
    return np.dtype(_NUMPY_DTYPES[dtype]).itemsize


@dataclass(frozen=True)
class _Storage:
    """Where one storage's bytes are in a file (or, if compressed, which zip entry holds them)."""

    path: Path
    offset: int
    nbytes: int
    zip_entry: str | None = None

    def read(self, start: int, count: int, dtype: np.dtype) -> np.ndarray:
        """`count` elements of `dtype` from byte `start` of the storage, as a fresh array."""
        try:
            if self.zip_entry is None:
                flat = np.fromfile(self.path, dtype=dtype, count=count, offset=self.offset + start)
            else:
                with zipfile.ZipFile(self.path) as archive, archive.open(self.zip_entry) as entry:
                    entry.seek(start)
                    flat = np.frombuffer(bytearray(entry.read(count * dtype.itemsize)), dtype)
        except OSError as error:
            raise CheckpointError(f"{self.path}: cannot read ({error.strerror})") from error
        except _ZIP_ERRORS as error:
            raise CheckpointError(
                f"{self.path}: corrupt compressed storage '{self.zip_entry}' ({_one_line(error)})"
            ) from error
        if flat.size != count:
            raise CheckpointError(f"{self.path}: truncated, tensor data ends past the end of file")
        return flat


class TensorRef:
    """A tensor in a checkpoint file, read only when `.numpy()` or `.mlx()` is called."""

    __slots__ = ("shape", "dtype", "_storage", "_strides", "_offset", "_byteorder")

    def __init__(
        self,
        storage: _Storage,
        dtype: str,
        shape: tuple[int, ...],
        strides: tuple[int, ...] | None = None,
        offset: int = 0,
        byteorder: str = "little",
    ):
        self.shape = shape
        self.dtype = dtype
        self._storage = storage
        # Strides and offset count elements, as in torch; None means C-contiguous.
        self._strides = strides if strides is not None else _contiguous_strides(shape)
        self._offset = offset
        self._byteorder = "<" if byteorder == "little" else ">"

    def __repr__(self) -> str:
        return f"TensorRef(shape={self.shape}, dtype='{self.dtype}')"

    @property
    def nbytes(self) -> int:
        """The bytes `.numpy()` returns (bfloat16 counted as stored, 2 bytes an element)."""
        return math.prod(self.shape) * _itemsize(self.dtype)

    def _span(self) -> int:
        """How many storage elements, from the first one, this tensor's elements lie within."""
        if 0 in self.shape:
            return 0
        pairs = zip(self.shape, self._strides, strict=True)
        return 1 + sum((size - 1) * stride for size, stride in pairs)

    def _read_cost(self) -> int:
        """The bytes reading it produces: its own, and for a compressed storage all the bytes
        inflated on the way to its elements."""
        span = self._span()
        inflated = (self._offset + span) * _itemsize(self.dtype) if span else 0
        return max(self.nbytes, inflated if self._storage.zip_entry else 0)

    def _read_bits(self) -> np.ndarray:
        """The tensor as a fresh C-contiguous array in native byte order (bfloat16 as uint16)."""
        native = np.dtype(_NUMPY_DTYPES[self.dtype])
        span = self._span()
        if span == 0:
            return np.empty(self.shape, native)
        stored = native.newbyteorder(self._byteorder)
        flat = self._storage.read(self._offset * native.itemsize, span, stored)
        strides = [stride * native.itemsize for stride in self._strides]
        view = np.lib.stride_tricks.as_strided(flat, self.shape, strides)
        # Copies only when the view is strided or byte-swapped; else it is `flat` itself.
        return view.astype(native, order="C", copy=False)

    def numpy(self) -> np.ndarray:
        """A fresh array; bfloat16 comes back as float32 (exactly: bf16 is truncated fp32)."""
        bits = self._read_bits()
        if self.dtype != "bfloat16":
            return bits
        widened = bits.astype(np.uint32)
        widened <<= 16
        return widened.view(np.float32)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        """An MLX array (bfloat16 stays bfloat16, float64 becomes MLX's float32), cast to `dtype`
        if given."""
        array = mx.array(self._read_bits())
        if self.dtype == "bfloat16":
            array = array.view(mx.bfloat16)
        return array if dtype is None else array.astype(dtype)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


# --- stand-ins for the globals a torch state-dict pickle names -------------------------------
# Everything find_class hands out is immutable to the pickle: BUILD (the opcode that sets state or
# attributes) fails on NamedTuples and on _Allowed, so one file cannot change how the next is read.


class _StorageType(NamedTuple):
    """Stands in for a class like torch.FloatStorage: only its dtype matters."""

    dtype: str


class _TypeName(NamedTuple):
    """Stands in for torch.Tensor / torch.nn.Parameter, which only ever appear as arguments."""

    name: str


class _StorageRecord(NamedTuple):
    key: str
    dtype: str
    numel: int


class _TensorRecord(NamedTuple):
    storage: _StorageRecord
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Allowed:
    """A function the pickle may call (REDUCE): the only callables it can ever get."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)

    def __setstate__(self, state) -> None:
        raise pickle.UnpicklingError("refusing BUILD on a global")


class _PickledDict(dict):
    """What collections.OrderedDict() makes: a plain dict that drops its BUILD state (a state
    dict's `_metadata`) and, without __dict__ or slots, takes no attributes."""

    __slots__ = ()

    def __setstate__(self, state) -> None:
        pass


def _is_count(value) -> bool:
    return isinstance(value, int) and value >= 0


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and all(_is_count(n) for n in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_grad_hooks_metadata) -> _TensorRecord:
    """torch._utils._rebuild_tensor_v2, recording where the tensor's elements are."""
    well_formed = (
        isinstance(storage, _StorageRecord)
        and _is_count(storage_offset)
        and _is_shape(size)
        and _is_shape(stride)
        and len(size) == len(stride)
    )
    if not well_formed:
        raise pickle.UnpicklingError("malformed tensor record")
    return _TensorRecord(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_grad_hooks_state) -> _TensorRecord:
    """torch._utils._rebuild_parameter(_with_state): a parameter is its tensor."""
    if not isinstance(data, _TensorRecord):
        raise pickle.UnpicklingError("malformed parameter record")
    return data


_REBUILD_TENSOR = _Allowed(_rebuild_tensor)
_REBUILD_PARAMETER = _Allowed(_rebuild_parameter)


def _rebuild_from_type(func, _new_type, args, _state) -> _TensorRecord:
    """torch._tensor._rebuild_from_type_v2 (a tensor with attributes): keep just the tensor."""
    if func not in (_REBUILD_TENSOR, _REBUILD_PARAMETER) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("malformed tensor record")
    return func(*args)


_SAFE_GLOBALS = {
    "collections.OrderedDict": _Allowed(_PickledDict),
    "torch._utils._rebuild_tensor_v2": _REBUILD_TENSOR,
    "torch._utils._rebuild_parameter": _REBUILD_PARAMETER,
    "torch._utils._rebuild_parameter_with_state": _REBUILD_PARAMETER,
    "torch._tensor._rebuild_from_type_v2": _Allowed(_rebuild_from_type),
    "torch.Tensor": _TypeName("torch.Tensor"),
    "torch.nn.parameter.Parameter": _TypeName("torch.nn.parameter.Parameter"),
    **{f"torch.{name}": _StorageType(dtype) for name, dtype in _TORCH_STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves globals only to the stand-ins above and refuses all others, so the only things a
    pickle can call (REDUCE, OBJ, INST) are the _Allowed functions, on validated arguments."""

    def __init__(self, path: Path, data: bytes):
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualified]
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"{self._path}: unsupported tensor type '{qualified}'")
        raise CheckpointError(
            f"{self._path}: refusing to unpickle global '{qualified}' (not a tensor state dict)"
        )

    def persistent_load(self, pid) -> _StorageRecord:
        # ('storage', storage class, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unsupported persistent id")
        _, storage_type, key, _location, numel = pid
        if not (
            isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_count(numel)
        ):
            raise pickle.UnpicklingError("malformed storage record")
        return _StorageRecord(key, storage_type.dtype, numel)


# --- PyTorch zip checkpoints ------------------------------------------------------------------


def _open_torch_zip(path: Path) -> dict[str, TensorRef]:
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {info.filename: info for info in archive.infolist()}
            pickle_name = _find_data_pkl(path, entries)
            prefix = pickle_name.removesuffix("data.pkl")
            byteorder = _read_byteorder(path, archive, entries, prefix, file_size)
            pickled = _read_entry(path, archive, entries[pickle_name], file_size)
    except _ZIP_ERRORS as error:
        raise CheckpointError(
            f"{path}: truncated or corrupt zip archive ({_one_line(error)})"
        ) from error
    records = _state_dict_tensors(path, _unpickle(path, pickled))
    storages: dict[str, _Storage] = {}
    refs = {}
    with open(path, "rb") as file:
        for key, record in records.items():
            storage_key = record.storage.key
            if storage_key not in storages:
                storages[storage_key] = _locate_storage(
                    path, file, file_size, entries, prefix, record.storage
                )
            refs[key] = _zip_tensor_ref(path, key, record, storages[storage_key], byteorder)
    return refs


def _check_entry(path: Path, entry: zipfile.ZipInfo, file_size: int) -> None:
    """Refuses an entry that cannot be read as it claims: encrypted, compressed by a method other
    than deflate, or inflating far beyond its compressed bytes (a zip bomb)."""
    name = entry.filename
    if entry.flag_bits & 0x1:
        raise CheckpointError(f"{path}: zip entry '{name}' is encrypted")
    if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(
            f"{path}: zip entry '{name}' uses compression method {entry.compress_type} "
            "(only stored or deflated are read)"
        )
    if entry.header_offset < 0 or entry.header_offset + entry.compress_size > file_size:
        raise CheckpointError(f"{path}: truncated, zip entry '{name}' ends past the end of file")
    if entry.compress_type == zipfile.ZIP_STORED and entry.compress_size != entry.file_size:
        raise CheckpointError(f"{path}: corrupt zip entry '{name}' (stored, yet sizes differ)")
    if entry.file_size > max(_MAX_GROWTH * entry.compress_size, _INFLATE_ALLOWANCE):
        raise CheckpointError(
            f"{path}: zip entry '{name}' would inflate {entry.compress_size} bytes to "
            f"{entry.file_size} (at most {_MAX_GROWTH}x, a zip bomb?)"
        )


def _read_entry(
    path: Path, archive: zipfile.ZipFile, entry: zipfile.ZipInfo, file_size: int
) -> bytes:
    """A small entry's bytes (data.pkl, byteorder), checked before anything is inflated."""
    _check_entry(path, entry, file_size)
    if entry.file_size > _MAX_METADATA_BYTES:
        raise CheckpointError(
            f"{path}: zip entry '{entry.filename}' holds {entry.file_size} bytes "
            f"(at most {_MAX_METADATA_BYTES})"
        )
    return archive.read(entry)


def _zip_tensor_ref(
    path: Path, key: str, record: _TensorRecord, storage: _Storage, byteorder: str
) -> TensorRef:
    dtype = record.storage.dtype
    ref = TensorRef(storage, dtype, record.size, record.stride, record.offset, byteorder)
    # Checked against the bytes really there, whatever numel the pickle claims.
    capacity = storage.nbytes // _itemsize(dtype)
    end = record.offset + ref._span()
    if ref._span() and end > capacity:
        raise CheckpointError(
            f"{path}: tensor '{key}' needs {end} elements of a storage that holds {capacity}"
        )
    return ref


def _find_data_pkl(path: Path, entries: dict[str, zipfile.ZipInfo]) -> str:
    # torch writes `<prefix>/data.pkl`; the prefix is arbitrary (`archive`, the file's stem).
    for name in entries:
        if name.count("/") == 1 and name.endswith("/data.pkl"):
            return name
    raise CheckpointError(f"{path}: a zip without data.pkl, not a PyTorch checkpoint")


def _read_byteorder(
    path: Path, archive: zipfile.ZipFile, entries: dict, prefix: str, file_size: int
) -> str:
    if f"{prefix}byteorder" not in entries:
        return "little"
    raw = _read_entry(path, archive, entries[f"{prefix}byteorder"], file_size)
    byteorder = raw[:16].decode(errors="replace").strip()
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byte order '{byteorder}'")
    return byteorder


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _unpickle(path: Path, pickled: bytes):
    try:
        _check_pickle_shape(path, pickled)
        return _StateDictUnpickler(path, pickled).load()
    except CheckpointError:
        raise
    except Exception as error:  # whatever a corrupt pickle makes the unpickler raise
        raise CheckpointError(f"{path}: corrupt data.pkl ({_one_line(error)})") from error


# Opcodes that add to the container below their arguments and leave it on the stack.
_MUTATING_OPCODES = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


def _check_pickle_shape(path: Path, pickled: bytes) -> None:
    """Refuses, before unpickling, a pickle whose objects nest deeper than a state dict's or are,
    through shared references, far larger than its bytes: hashing such a dict key overflows the
    C stack (a crash) or takes exponential time. Follows the pickle machine's stack, each item as
    (depth, size), from pickletools' account of what each opcode takes and leaves."""
    max_size = 16 * len(pickled) + 4096
    stack: list[tuple[int, int] | None] = []  # None is a mark
    memo: dict = {}
    for opcode, arg, _ in pickletools.genops(pickled):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if opcode.name == "MEMOIZE" else arg] = stack[-1]
            continue
        if opcode.name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
            continue
        taken = _take(stack, opcode.stack_before)
        if opcode.name in _MUTATING_OPCODES:
            (depth, size), items = taken[0], taken[1:]
            depth = max([depth] + [d + 1 for d, _ in items])
            size += sum(s for _, s in items)
        else:
            depth = 1 + max((d for d, _ in taken), default=-1)
            size = 1 + sum(s for _, s in taken)
        if depth > _MAX_PICKLE_DEPTH:
            raise CheckpointError(
                f"{path}: data.pkl nests objects over {_MAX_PICKLE_DEPTH} deep, "
                "not a tensor state dict"
            )
        if size > max_size:
            raise CheckpointError(
                f"{path}: data.pkl builds objects far larger than its {len(pickled)} bytes "
                "(shared references), not a tensor state dict"
            )
        after = opcode.stack_after
        stack.extend(None if item is pickletools.markobject else (depth, size) for item in after)


def _take(stack: list, before: list) -> list:
    """Removes the items an opcode takes from `stack`: those it names, then all above a mark."""
    above_mark = []
    if pickletools.markobject in before:
        if None not in stack:
            raise pickle.UnpicklingError("a mark is missing")
        mark = len(stack) - 1 - stack[::-1].index(None)
        above_mark = stack[mark + 1 :]
        del stack[mark:]
        before = before[: before.index(pickletools.markobject)]
    start = len(stack) - len(before)
    named = stack[start:]
    if start < 0 or None in named:
        raise pickle.UnpicklingError("the stack does not hold what an opcode takes")
    del stack[start:]
    return named + above_mark


def _state_dict_tensors(path: Path, top) -> dict[str, _TensorRecord]:
    """The top-level dict's tensors, or those of its single state_dict / model / module dict."""
    if not isinstance(top, dict):
        what = "a single tensor" if isinstance(top, _TensorRecord) else f"a {type(top).__name__}"
        raise CheckpointError(f"{path}: holds {what}, not a state dict")
    tensors = _tensors_in(top)
    if tensors:
        return tensors
    nested = [key for key in ("state_dict", "model", "module") if _tensors_in(top.get(key))]
    if len(nested) == 1:
        return _tensors_in(top[nested[0]])
    if nested:
        raise CheckpointError(f"{path}: holds several state dicts ({', '.join(nested)})")
    keys = ", ".join(str(key) for key in list(top)[:8])
    raise CheckpointError(f"{path}: holds no tensors (top-level keys: {keys})")


def _tensors_in(value) -> dict[str, _TensorRecord]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, _TensorRecord)}


def _locate_storage(
    path: Path,
    file,
    file_size: int,
    entries: dict[str, zipfile.ZipInfo],
    prefix: str,
    record: _StorageRecord,
) -> _Storage:
    name = f"{prefix}data/{record.key}"
    entry = entries.get(name)
    if entry is None:
        raise CheckpointError(f"{path}: storage entry '{name}' is missing")
    _check_entry(path, entry, file_size)
    needed = record.numel * _itemsize(record.dtype)
    if entry.file_size < needed:
        raise CheckpointError(
            f"{path}: storage '{name}' holds {entry.file_size} bytes, not {needed}"
        )
    if entry.compress_type != zipfile.ZIP_STORED:
        return _Storage(path, 0, entry.file_size, zip_entry=name)
    # The data follows the entry's local header: 30 bytes, then the name and the extra field.
    file.seek(entry.header_offset)
    header = file.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip archive (bad local header for '{name}')")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    offset = entry.header_offset + 30 + name_length + extra_length
    if offset + entry.file_size > file_size:
        raise CheckpointError(f"{path}: truncated, storage '{name}' ends past the end of file")
    return _Storage(path, offset, entry.file_size)


# --- safetensors ------------------------------------------------------------------------------


def _open_safetensors(path: Path) -> dict[str, TensorRef]:
    # Format: u64 little-endian header length, a JSON header, then the tensors' bytes.
    file_size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
        (header_length,) = struct.unpack("<Q", head)
        if 8 + header_length > file_size:
            raise CheckpointError(f"{path}: truncated safetensors file (header past end of file)")
        if header_length > _MAX_METADATA_BYTES:
            raise CheckpointError(
                f"{path}: safetensors header of {header_length} bytes "
                f"(at most {_MAX_METADATA_BYTES})"
            )
        header = _parse_json(path, file.read(header_length), "safetensors header")
    data_start = 8 + header_length
    refs = {}
    for key, entry in header.items():
        if key != "__metadata__":
            refs[key] = _safetensors_ref(path, key, entry, data_start, file_size)
    return refs


def _parse_json(path: Path, text: bytes, what: str) -> dict:
    """A JSON object, or a one-line error naming the file: bad UTF-8 or JSON, an integer too long
    to convert, nesting too deep for the parser."""
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{path}: corrupt {what} ({_one_line(error)})") from error
    except RecursionError as error:
        raise CheckpointError(f"{path}: corrupt {what} (JSON nested too deeply)") from error
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: corrupt {what} (not a JSON object)")
    return parsed


def _safetensors_ref(path: Path, key: str, entry, data_start: int, file_size: int) -> TensorRef:
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors entry for '{key}'") from error
    if not isinstance(shape, list):
        raise CheckpointError(f"{path}: corrupt safetensors entry for '{key}' (shape not a list)")
    shape = tuple(shape)
    _check_dimensions(path, key, shape)
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        shown = str(dtype_name)[:40] if isinstance(dtype_name, str) else "(not a string)"
        raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {shown}")
    if not (_is_shape(shape) and _is_count(begin) and _is_count(end)):
        raise CheckpointError(f"{path}: corrupt safetensors entry for '{key}'")
    if end - begin != math.prod(shape) * _itemsize(dtype):
        raise CheckpointError(f"{path}: tensor '{key}' has {end - begin} bytes for shape {shape}")
    if data_start + end > file_size:
        raise CheckpointError(f"{path}: truncated safetensors file ('{key}' ends past end of file)")
    return TensorRef(_Storage(path, data_start + begin, end - begin), dtype, shape)


# --- sharded indexes, folders, sniffing -------------------------------------------------------


def _open_index(path: Path) -> dict[str, TensorRef]:
    if path.stat().st_size > _MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: an index over {_MAX_METADATA_BYTES} bytes")
    weight_map = _parse_json(path, path.read_bytes(), "checkpoint index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: not a checkpoint index (no JSON 'weight_map')")
    if not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(f"{path}: not a checkpoint index (a shard is not a file name)")
    shard_of: dict[str, str] = weight_map
    refs: dict[str, TensorRef] = {}
    found_in: dict[str, str] = {}
    for shard in dict.fromkeys(shard_of.values()):
        for key, ref in _open_file(_shard_path(path, shard)).items():
            if key in found_in:
                raise CheckpointError(
                    f"{path}: '{key}' is in two shards, {found_in[key]} and {shard}"
                )
            found_in[key] = shard
            refs[key] = ref
    for key, shard in shard_of.items():
        if found_in.get(key) != shard:
            raise CheckpointError(f"{path}: '{key}' is not in its shard '{shard}'")
    return refs


def _shard_path(index: Path, shard: str) -> Path:
    """The shard's file, inside the index's folder: never an absolute path, never through '..',
    never out through a symlink (but into the hub cache's blobs, where its snapshots link), and
    never another index, so that indexes cannot name each other."""
    name = shard[:80]
    if not shard or "\0" in shard:
        raise CheckpointError(f"{index}: shard '{name}' is not a file name")
    if PurePath(shard).is_absolute() or ".." in PurePath(shard).parts:
        raise CheckpointError(f"{index}: shard '{name}' points outside the checkpoint's folder")
    if shard.endswith(".json"):
        raise CheckpointError(f"{index}: shard '{name}' is an index, not a weights file")
    shard_path = index.parent / shard
    if not shard_path.is_file():
        raise CheckpointError(f"{index}: shard '{name}' is missing")
    folder = index.parent.resolve()
    inside = [folder]
    if folder.parent.name == "snapshots":
        inside.append(folder.parent.parent / "blobs")
    if not any(shard_path.resolve().is_relative_to(root) for root in inside):
        raise CheckpointError(f"{index}: shard '{name}' links outside the checkpoint's folder")
    return shard_path


def _find_checkpoint_in(folder: Path) -> Path:
    for name in _FOLDER_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    for patterns in _FOLDER_FALLBACKS:
        found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(f"{folder}: several checkpoints, pass one of them: {names}")
    raise CheckpointError(f"{folder}: no checkpoint (.safetensors, .bin, .pt, .pth) in this folder")


def _check_dimensions(path: Path, key: str, shape: tuple) -> None:
    if len(shape) > _MAX_DIMENSIONS:
        raise CheckpointError(
            f"{path}: tensor '{key}' has {len(shape)} dimensions (at most {_MAX_DIMENSIONS})"
        )


def _within_growth_limit(path: Path, refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The file's tensors, unless reading them would produce far more than the file's size: a
    huge shape over one stored element (stride 0), many tensors over one storage, a zip bomb."""
    file_size = path.stat().st_size
    limit = _growth_limit(file_size)
    total = 0
    for key, ref in refs.items():
        _check_dimensions(path, key, ref.shape)
        # An empty tensor reads nothing, yet numpy refuses a shape whose other sizes overflow.
        extent = math.prod(max(size, 1) for size in ref.shape) * _itemsize(ref.dtype)
        total += ref._read_cost()
        if max(extent, total) > limit:
            raise CheckpointError(
                f"{path}: tensor '{key}' of shape {ref.shape} would read out to "
                f"{max(extent, total)} bytes, more than this {file_size}-byte file may "
                f"({_MAX_GROWTH}x its size, at least {_GROWTH_ALLOWANCE >> 20} MiB)"
            )
    return refs


def _open_file(path: Path) -> dict[str, TensorRef]:
    if path.name.endswith(".json"):
        return _open_index(path)
    with open(path, "rb") as file:
        head = file.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(b"PK"):
        return _within_growth_limit(path, _open_torch_zip(path))
    if len(head) > 8 and head[8:9] == b"{":
        return _within_growth_limit(path, _open_safetensors(path))
    if head.startswith(_LEGACY_TORCH_MAGIC):
        raise CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) PyTorch format, not supported; "
            "re-save it with a recent torch: torch.save(torch.load(f), f)"
        )
    what = "empty file" if not head else "unknown format"
    raise CheckpointError(
        f"{path}: {what}, not a PyTorch zip checkpoint, a .safetensors file or an .index.json"
    )


def open_checkpoint(path: str | Path) -> dict[str, TensorRef]:
    """Lazy tensors of a checkpoint: a PyTorch zip-pickle or safetensors file (by content), a
    sharded `*.index.json`, or a folder holding one of these."""
    path = Path(path)
    try:
        if path.is_dir():
            path = _find_checkpoint_in(path)
        elif not path.is_file():
            raise CheckpointError(f"{path}: no such file or folder")
        return _open_file(path)
    except OSError as error:
        raise CheckpointError(
            f"{error.filename or path}: cannot read ({error.strerror})"
        ) from error


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy arrays (bfloat16 as float32); see open_checkpoint."""
    return {key: ref.numpy() for key, ref in open_checkpoint(path).items()}
