"""Lossy zarr v3 codecs for feature arrays: mantissa bit rounding and 8-bit codes per channel.

Both run before the store's zstd and decode in any zarr reader where featurestore is installed:
they are registered with zarr here and as `zarr.codecs` entry points (pyproject.toml), so
`zarr.open_array` and `xarray.open_zarr` decode them without importing featurestore. Both keep
non-finite values exactly as they were, so the store still counts and refuses them, and neither
turns a finite value into a non-finite one. This module knows nothing of torch.

- `BitRoundCodec(keepbits=K)` ("featurestore.bitround", an array-to-array filter): every finite
  value is rounded to K mantissa bits, round-to-nearest-even on the stored dtype, as in Klöwer et
  al. 2021, "Compressing atmospheric data into its real information content" (Nature
  Computational Science 1, 713-724). For normal numbers |x - r| <= 2^-(K+1) |x|; zeros, signs and
  inf/NaN are kept. A value that would round beyond the dtype's largest finite number (float16:
  65504) keeps to the largest K-bit number below it instead (|x - r| <= 2^-K |x|). Decoding is
  the identity: the rounded values are ordinary floats.
- `Int8Codec()` ("featurestore.int8", the array-to-bytes serializer): per chunk and per channel
  (axis 1 of an (n, C, ...) chunk) an affine 8-bit code, offset = min and scale = (max - min)/255
  over the chunk's rows, as in the asymmetric quantization of Jacob et al. 2018, "Quantization
  and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR). It
  decodes to the stored dtype with |x - decode(encode(x))| <= scale/2 per channel, plus the
  rounding of offset + scale * code in float32 and of the cast to the stored dtype. Rows that are
  all zero (failed images, the padding of a last partial chunk) are left out of min and max and
  decode to exact zeros; a constant channel (scale 0) decodes exactly. A chunk holding inf/NaN, or
  a channel whose range exceeds float32, is stored as is (losslessly) instead.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayArrayCodec, ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType

BITROUND = "featurestore.bitround"
INT8 = "featurestore.int8"
MANTISSA_BITS = {"float16": 10, "float32": 23}  # explicit mantissa bits of the IEEE 754 binary16 / binary32
_UINT = {"float16": np.uint16, "float32": np.uint32}
_EXPONENT_BITS = {"float16": 0x7C00, "float32": 0x7F800000}  # all set: inf or NaN
_RAW, _CODED = 0, 1  # first byte of an Int8Codec chunk: stored as is, or as 8-bit codes


def _float_dtype(dtype: ZDType[TBaseDType, TBaseScalar] | np.dtype, codec: str) -> str:
    """'float16' or 'float32'; ValueError for any other dtype."""
    native = np.dtype(dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else dtype)
    if native.name not in MANTISSA_BITS:
        raise ValueError(f"codec {codec} takes float16 or float32 arrays, not {native.name}")
    return native.name


def bitround(values: np.ndarray, keepbits: int) -> np.ndarray:
    """`values` (float16 or float32, any shape) with every finite value rounded to `keepbits`
    mantissa bits, round-to-nearest-even on the integer view of the floats; inf/NaN unchanged,
    a finite value never rounded to inf (see the module docstring). Returns a new array."""
    name = _float_dtype(values.dtype, BITROUND)
    drop = MANTISSA_BITS[name] - keepbits
    if not 0 < keepbits < MANTISSA_BITS[name]:
        raise ValueError(f"bitround keeps 1..{MANTISSA_BITS[name] - 1} mantissa bits of {name}, not {keepbits}")
    uint = _UINT[name]
    bits = np.ascontiguousarray(values).view(uint)
    sign_bit = uint(1 << (8 * bits.itemsize - 1))
    exponent = uint(_EXPONENT_BITS[name])
    magnitude = bits & ~sign_bit
    # add half a step (minus one), plus one when the last kept bit is odd (ties go to even), then
    # clear the dropped bits
    half_step, last_kept = uint((1 << (drop - 1)) - 1), (magnitude >> uint(drop)) & uint(1)
    rounded = (magnitude + half_step + last_kept) & ~uint((1 << drop) - 1)
    largest = exponent - uint(1 << drop)  # the largest finite value with `keepbits` mantissa bits
    rounded = np.minimum(rounded, largest)
    out = np.where(magnitude >= exponent, bits, (bits & sign_bit) | rounded)
    return out.astype(uint, copy=False).view(values.dtype)


@dataclass(frozen=True)
class BitRoundCodec(ArrayArrayCodec):
    """Keep `keepbits` mantissa bits of every finite value (see `bitround`); decoding is the identity."""

    is_fixed_size = True
    keepbits: int

    def __init__(self, *, keepbits: int) -> None:
        if not isinstance(keepbits, int) or keepbits < 1:
            raise ValueError(f"{BITROUND}: keepbits must be a positive integer, not {keepbits!r}")
        object.__setattr__(self, "keepbits", keepbits)

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, configuration = parse_named_configuration(data, BITROUND)
        return cls(**configuration)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": BITROUND, "configuration": {"keepbits": self.keepbits}}

    def validate(self, *, shape: tuple[int, ...], dtype: ZDType[TBaseDType, TBaseScalar],
                 chunk_grid: ChunkGrid) -> None:
        name = _float_dtype(dtype, BITROUND)
        if self.keepbits >= MANTISSA_BITS[name]:
            raise ValueError(f"{BITROUND} keeps 1..{MANTISSA_BITS[name] - 1} mantissa bits of {name}, "
                             f"not {self.keepbits}")

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer:
        rounded = await asyncio.to_thread(bitround, chunk_array.as_numpy_array(), self.keepbits)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(rounded)

    async def _decode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer:
        return chunk_array

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        return input_byte_length


def int8_encode(values: np.ndarray) -> bytes:
    """One (n, C, ...) float16/float32 chunk as bytes: a format byte, then either the values as
    stored (little-endian; when the chunk holds inf/NaN or a channel's range exceeds float32), or
    the zero-row bit mask (ceil(n/8) bytes), C float32 offsets, C float32 scales and n*C*... uint8
    codes, all little-endian. code = round((x - offset) / scale), clipped to 0..255."""
    _float_dtype(values.dtype, INT8)
    if values.ndim < 2:
        raise ValueError(f"{INT8} needs chunks of shape (n, C, ...), not {values.shape}")
    n, c = values.shape[:2]
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(n, c, -1)
    row_min, row_max = x.min(axis=2), x.max(axis=2)  # (n, C); NaN when a row-channel holds NaN
    zero = (row_min == 0) & (row_max == 0)
    zero_rows = zero.all(axis=1)
    live_min, live_max = row_min[~zero_rows], row_max[~zero_rows]
    offset = live_min.min(axis=0) if len(live_min) else np.zeros(c, np.float32)
    span = (live_max.max(axis=0) if len(live_max) else np.zeros(c, np.float32)).astype(np.float64) - offset
    finite = np.isfinite(row_min).all() and np.isfinite(row_max).all()
    if not finite or span.max(initial=0) > np.finfo(np.float32).max:
        return bytes([_RAW]) + values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
    scale = (span / 255).astype(np.float32)
    scale = np.where(scale.astype(np.float64) * 255 < span, np.nextafter(scale, np.float32(np.inf)), scale)
    q = x - offset[None, :, None]
    q /= np.where(scale > 0, scale, 1)[None, :, None]  # a constant channel: x - offset is 0
    np.rint(q, out=q)
    codes = np.clip(q, 0, 255, out=q).astype(np.uint8)
    codes[zero_rows] = 0
    return b"".join([bytes([_CODED]), np.packbits(zero_rows).tobytes(), offset.astype("<f4").tobytes(),
                     scale.astype("<f4").tobytes(), codes.tobytes()])


def int8_decode(data: bytes | np.ndarray, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """The chunk of `shape` and `dtype` that `int8_encode` wrote into `data`: offset + scale *
    code per channel, in float32, cast to `dtype`; zero rows exact. ValueError for bytes that are
    not such a chunk."""
    dtype = np.dtype(dtype)
    buf = np.frombuffer(data, dtype=np.uint8)
    n, c = shape[:2]
    size = int(np.prod(shape))
    mask = -(-n // 8)
    expected = {_RAW: 1 + size * dtype.itemsize, _CODED: 1 + mask + 8 * c + size}
    if len(buf) == 0 or int(buf[0]) not in expected or len(buf) != expected[int(buf[0])]:
        raise ValueError(f"{INT8}: {len(buf)} bytes are not a chunk of shape {shape} and dtype {dtype.name}")
    if buf[0] == _RAW:
        return buf[1:].view(dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    zero_rows = np.unpackbits(buf[1 : 1 + mask], count=n).astype(bool)
    at = 1 + mask
    offset = buf[at : at + 4 * c].view("<f4").astype(np.float32)
    scale = buf[at + 4 * c : at + 8 * c].view("<f4").astype(np.float32)
    codes = buf[at + 8 * c :].reshape(n, c, -1)
    y = codes.astype(np.float32)
    y *= scale[None, :, None]
    y += offset[None, :, None]
    y[zero_rows] = 0
    return y.astype(dtype).reshape(shape)


@dataclass(frozen=True)
class Int8Codec(ArrayBytesCodec):
    """8-bit codes per chunk and channel with the scales and offsets in the chunk (see `int8_encode`)."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        parse_named_configuration(data, INT8, require_configuration=False)
        return cls()

    def to_dict(self) -> dict[str, JSON]:
        return {"name": INT8}

    def validate(self, *, shape: tuple[int, ...], dtype: ZDType[TBaseDType, TBaseScalar],
                 chunk_grid: ChunkGrid) -> None:
        _float_dtype(dtype, INT8)
        if len(shape) < 2:
            raise ValueError(f"{INT8} needs arrays of shape (n, C, ...), not {shape}")

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        data = await asyncio.to_thread(int8_encode, chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        values = await asyncio.to_thread(int8_decode, chunk_bytes.as_numpy_array(), chunk_spec.shape,
                                         chunk_spec.dtype.to_native_dtype())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(values)

    def compute_encoded_size(self, _input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # the size depends on whether a chunk is coded or stored as is


register_codec(BITROUND, BitRoundCodec)
register_codec(INT8, Int8Codec)


def parse_codec(codec: str, dtype: str) -> tuple[str, dict[str, Any]]:
    """("zstd" | "bitround" | "int8", parameters) of a codec name of `featurestore extract
    --codec`: `zstd`, `bitround:K` (K = 1..9 for float16, 1..22 for float32) or `int8`. Raises
    ValueError (one line) for anything else."""
    known = "zstd (lossless), bitround:K or int8"
    kind, _, arg = codec.partition(":")
    if codec in ("zstd", "int8"):
        return codec, {}
    if kind != "bitround":
        raise ValueError(f"unknown codec {codec!r}; use {known}")
    top = MANTISSA_BITS[_float_dtype(np.dtype(dtype), BITROUND)] - 1
    if not re.fullmatch(r"[1-9][0-9]*", arg) or int(arg) > top:
        raise ValueError(f"codec {codec!r}: bitround:K keeps K mantissa bits, K an integer in 1..{top} for {dtype}")
    return kind, {"keepbits": int(arg)}
