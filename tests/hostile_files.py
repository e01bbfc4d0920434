"""Hostile safetensors files: one named case per thing a file can try, with the exact error each must give.

The corpus is shared: test_reader.py asserts each error, test_fuzz_reader.py runs the fuzz harness over it, and
a crash the fuzzer finds is added here (tests/fuzz/README.md).
"""

import json
import struct


def sf(header, data=b"", length=None):
    """Raw safetensors bytes: header (dict or bytes) padded to 8, then data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def one(dtype="F32", shape=(2,), offsets=(0, 8), **extra):
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}}


def entry(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


Z8 = b"\0" * 8
W = ", tensor 'w': "
CORRUPT_JSON = "; the file is corrupt or not safetensors — re-export or re-download it"
SHAPE = W + "shape must be a list of at most 64 non-negative integers, got "
OFFSETS = W + "data_offsets must be [begin, end] with 0 <= begin <= end, got "
DTYPE = " (known: BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64, F8_E4M3, F8_E5M2)"
NESTED = ": header JSON is nested deeper than safetensors allows; the file is corrupt"
NOT_OBJECT = ": header must be a JSON object of tensors; the file is corrupt"
ENTRY_KEYS = "; it must have exactly dtype, shape, data_offsets — the file is corrupt"

# name -> (file bytes, the exact error after the file's path)
HOSTILE = {
    "empty_file": (b"", ": file is 0 bytes, too short for a safetensors header; it is truncated or empty"),
    "seven_bytes": (b"\x01" * 7, ": file is 7 bytes, too short for a safetensors header; it is truncated or empty"),
    "header_length_over_cap": (
        sf(one(), Z8, length=100_000_001),
        ": header length 100000001 exceeds the 100000000-byte cap (real headers are "
        "< 1 MB); the file is corrupt or not safetensors",
    ),
    "header_length_u64_max": (
        sf(one(), Z8, length=2**64 - 1),
        ": header length 18446744073709551615 exceeds the 100000000-byte cap (real "
        "headers are < 1 MB); the file is corrupt or not safetensors",
    ),
    "header_length_past_eof": (
        sf(one(), Z8, length=4096),
        ": header length 4096 is larger than the file (80 bytes); the file is truncated or not safetensors",
    ),
    "header_length_zero": (
        struct.pack("<Q", 0) + Z8,
        ": header is not valid JSON (Expecting value: line 1 column 1 (char 0))" + CORRUPT_JSON,
    ),
    "header_invalid_utf8": (
        sf(b'{"w\xff\xfe":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', Z8),
        ": header is not valid UTF-8 (byte 3 of the header); tensor names and metadata "
        "must be UTF-8 — the file is corrupt or not safetensors",
    ),
    "header_is_a_zip": (
        sf(b"PK\x03\x04 this is a zip", Z8),
        ": header is not valid JSON (Expecting value: line 1 column 1 (char 0))" + CORRUPT_JSON,
    ),
    "header_json_array": (sf(b"[1,2,3]", Z8), NOT_OBJECT),
    "header_json_string": (sf(b'"hello"', Z8), NOT_OBJECT),
    "header_with_bom": (
        sf("\ufeff".encode() + json.dumps(one()).encode(), Z8),
        ": header is not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 "
        "column 1 (char 0))" + CORRUPT_JSON,
    ),
    "header_nan_literal": (sf(b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', Z8), SHAPE + "[nan]"),
    "header_integer_5000_digits": (
        sf(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', Z8),
        ": header is not valid JSON (Exceeds the limit (4300 digits) for integer string conversion: value "
        "has 5000 digits; use sys.set_int_max_str_digits() to increase the limit)" + CORRUPT_JSON,
    ),
    "header_nested_12_deep": (sf(b'{"__metadata__":' + b'{"data_offsets":' * 12 + b'"x"' + b"}" * 13), NESTED),
    "header_recursion_bomb": (
        sf(b'{"__metadata__":' + b'{"data_offsets":' * 100_000 + b'"x"' + b"}" * 100_001),
        NESTED,
    ),
    "header_object_bomb_2mb": (
        sf(b'{"__metadata__":{"k":"v"},"x":[' + b"{}," * 700_000 + b"{}]}"),
        ": header JSON holds 700004 objects/lists where a valid header can hold at "
        "most 2; the file is corrupt or hostile",
    ),
    "duplicate_tensor_name": (
        sf(
            b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            Z8,
        ),
        ": header is not valid JSON (duplicate key 'w')" + CORRUPT_JSON,
    ),
    "duplicate_field_in_entry": (
        sf(b'{"w":{"dtype":"F32","dtype":"I64","shape":[2],"data_offsets":[0,8]}}', Z8),
        ": header is not valid JSON (duplicate key 'dtype')" + CORRUPT_JSON,
    ),
    "entry_is_list": (
        sf({"w": ["F32", [2], [0, 8]]}, Z8),
        W + "entry is a JSON list, not an object with dtype, shape, data_offsets; the file is corrupt",
    ),
    "entry_is_null": (
        sf({"w": None}, Z8),
        W + "entry is a JSON NoneType, not an object with dtype, shape, data_offsets; the file is corrupt",
    ),
    "entry_missing_shape": (
        sf({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, Z8),
        W + "entry has keys ['data_offsets', 'dtype']" + ENTRY_KEYS,
    ),
    "entry_extra_field": (
        sf(one(pointer=123), Z8),
        W + "entry has keys ['data_offsets', 'dtype', 'pointer', 'shape']" + ENTRY_KEYS,
    ),
    "dtype_unknown": (sf(one(dtype="F13"), Z8), W + "unknown dtype 'F13'" + DTYPE),
    "dtype_lowercase": (sf(one(dtype="f32"), Z8), W + "unknown dtype 'f32'" + DTYPE),
    "dtype_not_a_string": (sf(one(dtype=["F32"]), Z8), W + "unknown dtype ['F32']" + DTYPE),
    "shape_negative_dim": (sf(one(shape=(-2,)), Z8), SHAPE + "[-2]"),
    "shape_float_dim": (sf(one(shape=(2.0,)), Z8), SHAPE + "[2.0]"),
    "shape_bool_dim": (sf(one(shape=(True, 2)), Z8), SHAPE + "[True, 2]"),
    "shape_string": (sf({"w": entry("F32", "2", [0, 8])}, Z8), SHAPE + "'2'"),
    "shape_dim_2_pow_62": (sf(one(shape=(2**62,)), Z8), SHAPE + "[4611686018427387904]"),
    "shape_rank_65": (sf(one(shape=(1,) * 64 + (2,)), Z8), SHAPE + "[1" + ", 1" * 26 + "..."),
    "shape_product_overflows_u64": (
        sf(one(shape=(2**32,) * 3, offsets=(0, 0))),
        W + "byte size 0 != shape [4294967296, 4294967296, 4294967296] x F32 "
        "(316912650057057350374175801344 bytes); the file is corrupt",
    ),
    # In C, 2**61 * 8 elements * 4 bytes wraps to 0 (and + 8 to 8): a size check done
    # in uint64 would pass and hand a kernel a 2**66-byte tensor. Python ints do not wrap.
    "shape_times_itemsize_wraps_to_0": (
        sf(one(shape=(2**61, 8), offsets=(0, 0))),
        W + "byte size 0 != shape [2305843009213693952, 8] x F32 (73786976294838206464 bytes); the file is corrupt",
    ),
    "shape_times_itemsize_wraps_to_8": (
        sf(one(shape=(2**61 + 1, 8), offsets=(0, 8)), Z8),
        W + "byte size 8 != shape [2305843009213693953, 8] x F32 (73786976294838206496 bytes); the file is corrupt",
    ),
    "offsets_negative": (sf(one(offsets=(-8, 0)), Z8), OFFSETS + "[-8, 0]"),
    "offsets_reversed": (sf(one(offsets=(8, 0)), Z8), OFFSETS + "[8, 0]"),
    "offsets_three_values": (sf(one(offsets=(0, 8, 16)), Z8), OFFSETS + "[0, 8, 16]"),
    "offsets_float": (sf(one(offsets=(0, 8.0)), Z8), OFFSETS + "[0, 8.0]"),
    "offsets_minus_zero": (sf(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', Z8), OFFSETS + "[-0.0, 8]"),
    "offsets_wrap_2_pow_64": (
        sf(one(offsets=(2**64 - 8, 2**64)), Z8),
        OFFSETS + "[18446744073709551608, 18446744073709551616]",
    ),
    "offsets_past_eof": (
        sf(one(offsets=(8, 16)), Z8),
        W + "data_offsets [8, 16] run past the end of the file (data section is 8 bytes); the file is truncated",
    ),
    "offsets_size_mismatch": (
        sf(one(shape=(3,)), Z8),
        W + "byte size 8 != shape [3] x F32 (12 bytes); the file is corrupt",
    ),
    "offsets_overlap": (
        sf({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [4, 12])}, b"\0" * 12),
        ", tensor 'b': byte range overlaps the previous tensor (starts at 4, previous ends at 8); the file is corrupt",
    ),
    "offsets_alias_same_bytes": (
        sf({"a": entry("F32", [2], [0, 8]), "b": entry("I32", [2], [0, 8])}, Z8),
        ", tensor 'b': byte range overlaps the previous tensor (starts at 0, previous ends at 8); the file is corrupt",
    ),
    "offsets_gap": (
        sf({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [1], [8, 12])}, b"\0" * 12),
        ", tensor 'b': gap of 4 bytes before this tensor; safetensors requires tensors packed "
        "back to back — the file is corrupt",
    ),
    "offsets_gap_at_start": (
        sf(one(offsets=(4, 12)), b"\0" * 12),
        W + "gap of 4 bytes before this tensor; safetensors requires tensors packed back to back — the file is corrupt",
    ),
    "trailing_hidden_payload": (
        sf(one(), Z8 + b"hidden payload"),
        ": 14 trailing bytes after the last tensor; the file is corrupt or was appended to",
    ),
    "truncated_data": (
        sf(one(), b"\0" * 5),
        W + "data_offsets [0, 8] run past the end of the file (data section is 5 bytes); the file is truncated",
    ),
    "metadata_not_object": (
        sf({"__metadata__": ["format", "pt"], **one()}, Z8),
        ": __metadata__ must map strings to strings; the file is corrupt",
    ),
    "metadata_value_not_string": (
        sf({"__metadata__": {"format": 1}, **one()}, Z8),
        ": __metadata__ must map strings to strings; the file is corrupt",
    ),
    "metadata_lone_surrogate": (
        sf(b'{"__metadata__":{"format":"\\udc00"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', Z8),
        ": __metadata__ holds a string that is not valid UTF-8 (a lone surrogate escape)",
    ),
    "name_lone_surrogate": (
        sf(b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', Z8),
        ", tensor '\\ud800': tensor name is not valid UTF-8 (a lone surrogate escape); the file is corrupt",
    ),
}
