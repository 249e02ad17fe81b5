"""PEFT LoRA <-> GGUF: a llama.cpp LoRA adapter, a merged full model, and the way back.

The layout follows what llama.cpp's adapter loader accepts (shared/reference/gguf-lora.md §1, §6):
`lora_a` is PEFT's A [r, in] as-is, `lora_b` is PEFT's B [out, r] as-is (ggml `ne` is the reversed
numpy shape), alpha is a FLOAT32 and llama.cpp scales by alpha / r per tensor. For the `llama`
arch the HF->GGUF conversion permutes the rows of q/k for its RoPE layout, so lora_B of q/k (and
the merged q/k weights) get the same row permutation.

Pure helpers come first (names, permutation, scaling, offline validation); file I/O follows.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from shared.files import ensure_private_dir

if TYPE_CHECKING:
    import torch

AdapterDtype = Literal["f32", "f16"]
MergedDtype = Literal["f32", "f16", "q8_0"]

KEY_ARCH = "general.architecture"
KEY_TYPE = "general.type"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"
KEY_FILE_TYPE = "general.file_type"
KEY_ALIGNMENT = "general.alignment"
KEY_QUANT_VERSION = "general.quantization_version"

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file

SUFFIX_A = ".lora_a"
SUFFIX_B = ".lora_b"
# Archs whose HF->GGUF conversion row-permutes attn_q/attn_k (transformers undoes it on load).
ROPE_PERMUTED_ARCHS = frozenset({"llama"})
# Prefixes PEFT puts in front of the wrapped model's module paths.
_PEFT_PREFIXES = ("base_model.model.",)

_QTYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
}
_FILE_TYPES: dict[GGMLQuantizationType, gguf.LlamaFileType] = {
    GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


class GGUFLoraError(ValueError):
    """An adapter or model that cannot be exported, or would not load in llama.cpp."""


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA-adapted Linear in HF layout: delta W = scaling * b @ a."""

    module: str  # HF module path without PEFT prefixes, e.g. model.layers.0.self_attn.q_proj
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> np.ndarray:
        """scaling * B @ A in float32, HF (out, in) layout."""
        return (self.b.astype(np.float32) @ self.a.astype(np.float32)) * np.float32(self.scaling)


@dataclass(frozen=True)
class Heads:
    """Attention head counts: the q/k permutation is per head."""

    n_head: int
    n_head_kv: int


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def hf_module_name(name: str) -> str:
    """Strip PEFT's wrapper prefixes and a trailing `.base_layer` from a module path."""
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.removesuffix(".base_layer")


@lru_cache(maxsize=16)
def _name_map(arch: str, n_blocks: int) -> gguf.TensorNameMap:
    archs = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise GGUFLoraError(f"architecture {arch!r} is unknown to the installed gguf package")
    return gguf.get_tensor_name_map(archs[arch], n_blocks)


def gguf_weight_name(module: str, arch: str, n_blocks: int) -> str:
    """GGUF tensor name of a HF Linear's weight, e.g. `blk.3.attn_q.weight`."""
    mapped = _name_map(arch, n_blocks).get_name(hf_module_name(module))
    if mapped is None:
        raise GGUFLoraError(f"no GGUF tensor name for module {module!r} (arch {arch!r})")
    return f"{mapped}.weight"


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of q/k (per head: first half/second half -> interleaved pairs).

    Works on any array whose first axis is the output rows: a weight (out, in) or lora_B (out, r).
    """
    out = rows.shape[0]
    if out % (2 * n_head):
        raise GGUFLoraError(f"{out} rows do not split into {n_head} heads of even size")
    half = out // n_head // 2
    return rows.reshape(n_head, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `rope_permute` (GGUF -> HF row order)."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise GGUFLoraError(f"{out} rows do not split into {n_head} heads of even size")
    half = out // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def permute_heads(weight_name: str, arch: str, heads: Heads) -> int | None:
    """Head count the conversion permuted this tensor's rows with, or None if it did not."""
    if arch not in ROPE_PERMUTED_ARCHS:
        return None
    if weight_name.endswith(".attn_q.weight"):
        return heads.n_head
    if weight_name.endswith(".attn_k.weight"):
        return heads.n_head_kv
    return None


def to_gguf_rows(rows: np.ndarray, weight_name: str, arch: str, heads: Heads) -> np.ndarray:
    n = permute_heads(weight_name, arch, heads)
    return rows if n is None else rope_permute(rows, n)


def from_gguf_rows(rows: np.ndarray, weight_name: str, arch: str, heads: Heads) -> np.ndarray:
    n = permute_heads(weight_name, arch, heads)
    return rows if n is None else rope_unpermute(rows, n)


def b_for_alpha(lw: LoraWeights, alpha: float) -> np.ndarray:
    """lora_B rescaled so that llama.cpp's alpha / r reproduces PEFT's per-module scaling.

    Identity for plain LoRA (scaling == alpha / r); folds rsLoRA and rank/alpha patterns into B.
    """
    llama_scale = alpha / lw.rank if alpha else 1.0
    factor = lw.scaling / llama_scale
    return lw.b if factor == 1.0 else lw.b * np.float32(factor)


def adapter_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to B @ A (alpha 0 or absent means 1)."""
    return alpha / rank if alpha else 1.0


def adapter_problems(
    kv: Mapping[str, tuple[GGUFValueType, Any]],
    tensors: Mapping[str, tuple[int, ...]],
    base_arch: str,
    base_tensors: Mapping[str, tuple[int, ...]],
) -> list[str]:
    """Everything llama.cpp's adapter loader would refuse (or abort on), checked offline.

    `kv` maps key -> (value type, value); shapes are ggml `ne` order (innermost first).
    """
    problems: list[str] = []

    def want_string(key: str, expected: str) -> None:
        typ, val = kv.get(key, (None, None))
        if typ != GGUFValueType.STRING or val != expected:
            problems.append(f"{key} must be the STRING {expected!r}, got {val!r} ({_tname(typ)})")

    want_string(KEY_TYPE, "adapter")
    want_string(KEY_ADAPTER_TYPE, "lora")
    want_string(KEY_ARCH, base_arch)
    alpha_type, _ = kv.get(KEY_ALPHA, (None, None))
    if alpha_type != GGUFValueType.FLOAT32:
        # a wrong type aborts llama.cpp (GGML_ASSERT); a missing key silently means scale 1
        problems.append(f"{KEY_ALPHA} must be FLOAT32, got {_tname(alpha_type)}")

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in tensors.items():
        if name.endswith(SUFFIX_A):
            pairs.setdefault(name[: -len(SUFFIX_A)], {})["a"] = shape
        elif name.endswith(SUFFIX_B):
            pairs.setdefault(name[: -len(SUFFIX_B)], {})["b"] = shape
        else:
            problems.append(f"tensor {name!r} is neither {SUFFIX_A} nor {SUFFIX_B}")
    if not pairs:
        problems.append("adapter holds no LoRA tensors")

    for base, pair in sorted(pairs.items()):
        if set(pair) != {"a", "b"}:
            problems.append(f"LoRA pair for {base!r} is missing {'b' if 'a' in pair else 'a'}")
            continue
        if base not in base_tensors:
            problems.append(f"tensor {base!r} does not exist in the base model")
            continue
        w, a, b = base_tensors[base], pair["a"], pair["b"]
        if len(w) != 2 or len(a) != 2 or len(b) != 2:
            problems.append(f"{base!r}: expected 2-D tensors, got W{w} A{a} B{b} (ne order)")
            continue
        if base == "token_embd.weight":  # llama.cpp flips A and B for the embedding
            ok = w[0] == b[1] and w[1] == a[1] and a[0] == b[0]
        else:
            ok = w[0] == a[0] and w[1] == b[1] and a[1] == b[0]
        if not ok:
            problems.append(f"{base!r}: incompatible shapes W{w} A{a} B{b} (ne order)")
    return problems


def _tname(typ: GGUFValueType | None) -> str:
    return "missing" if typ is None else typ.name


def dominant_file_type(types: Iterable[tuple[GGMLQuantizationType, int]], fallback: int) -> int:
    """`general.file_type` for the type holding most matrix elements; `fallback` if unnamed."""
    counts: Counter[GGMLQuantizationType] = Counter()
    for qtype, n in types:
        counts[qtype] += n
    if not counts:
        return fallback
    top = counts.most_common(1)[0][0]
    return int(_FILE_TYPES[top]) if top in _FILE_TYPES else fallback


# ---------------------------------------------------------------------------------------------
# Reading a PEFT model
# ---------------------------------------------------------------------------------------------


def lora_weights(peft_model: Any) -> tuple[float, list[LoraWeights]]:
    """(lora_alpha, per-Linear weights) of the active adapter; refuses what GGUF cannot carry."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    adapter = _single_active_adapter(peft_model)
    alpha = float(peft_model.peft_config[adapter].lora_alpha)
    found: list[LoraWeights] = []
    for name, mod in peft_model.named_modules():
        if isinstance(mod, ModulesToSaveWrapper):
            raise GGUFLoraError(f"{name}: modules_to_save (full weights) cannot go into GGUF LoRA")
        if not isinstance(mod, LoraLayer) or adapter not in mod.active_adapters:
            continue
        if adapter in getattr(mod, "lora_embedding_A", {}):
            raise GGUFLoraError(f"{name}: embedding LoRA is not supported by this exporter")
        if adapter not in mod.lora_A:
            continue
        if mod.use_dora.get(adapter, False):
            raise GGUFLoraError(f"{name}: DoRA has no GGUF LoRA form")
        if getattr(mod, "lora_bias", {}).get(adapter, False):
            raise GGUFLoraError(f"{name}: lora_bias has no GGUF LoRA form")
        if getattr(mod, "fan_in_fan_out", False):
            raise GGUFLoraError(f"{name}: fan_in_fan_out (Conv1D) layers are not supported")
        if getattr(mod, "merged", False):
            raise GGUFLoraError(f"{name}: the adapter is merged into the weights; unmerge first")
        found.append(
            LoraWeights(
                module=hf_module_name(name),
                a=_to_numpy(mod.lora_A[adapter].weight),
                b=_to_numpy(mod.lora_B[adapter].weight),
                scaling=float(mod.scaling[adapter]),
            )
        )
    if not found:
        raise GGUFLoraError(f"adapter {adapter!r} adapts no Linear layer")
    return alpha, found


def _single_active_adapter(peft_model: Any) -> str:
    active = getattr(peft_model, "active_adapters", None) or [peft_model.active_adapter]
    if len(active) != 1:
        raise GGUFLoraError(f"export needs exactly one active adapter, got {list(active)}")
    return str(active[0])


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


# ---------------------------------------------------------------------------------------------
# GGUF file I/O
# ---------------------------------------------------------------------------------------------


def is_gguf(path: Path) -> bool:
    """Whether `path` is a readable GGUF file (by its magic; the name may have no suffix)."""
    try:
        with path.open("rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class _Base:
    reader: GGUFReader
    arch: str
    n_blocks: int
    heads: Heads

    @classmethod
    def open(cls, path: Path) -> _Base:
        reader = GGUFReader(path)
        arch = _field(reader, KEY_ARCH)
        if not isinstance(arch, str):
            raise GGUFLoraError(f"{path}: no {KEY_ARCH}")
        n_blocks = int(_field(reader, f"{arch}.block_count"))
        n_head = int(_field(reader, f"{arch}.attention.head_count"))
        n_kv = _field(reader, f"{arch}.attention.head_count_kv")
        return cls(reader, arch, n_blocks, Heads(n_head, int(n_kv) if n_kv else n_head))

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(int(n) for n in t.shape) for t in self.reader.tensors}


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _kv_types(reader: GGUFReader) -> dict[str, tuple[GGUFValueType, Any]]:
    return {
        name: (f.types[0], f.contents())
        for name, f in reader.fields.items()
        if not name.startswith("GGUF.") and f.types
    }


@dataclass
class _PrivateOutput:
    """A temp file beside `out`, readable by its owner only, renamed over `out` on success."""

    out: Path
    tmp: Path | None = None

    def __enter__(self) -> Path:
        ensure_private_dir(self.out.parent)
        fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
        os.fchmod(fd, 0o600)  # trained on personal conversations
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type: object, *_: object) -> None:
        assert self.tmp is not None
        if exc_type is None:
            os.replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)


def check_adapter(adapter_path: Path, base_gguf: Path) -> None:
    """Raise GGUFLoraError listing every reason llama.cpp would refuse the adapter on this base."""
    _check(adapter_path, _Base.open(base_gguf), base_gguf)


def _check(adapter_path: Path, base: _Base, base_gguf: Path) -> None:
    reader = GGUFReader(adapter_path)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    problems = adapter_problems(_kv_types(reader), shapes, base.arch, base.tensor_shapes())
    if problems:
        listed = "\n  ".join(problems)
        raise GGUFLoraError(f"adapter {adapter_path} does not fit base {base_gguf}:\n  {listed}")


def export_adapter(
    peft_model: Any, base_gguf: Path, out: Path, *, dtype: AdapterDtype = "f32"
) -> Path:
    """Write the active PEFT LoRA as a GGUF LoRA adapter for `base_gguf`, checked before return."""
    if dtype not in ("f32", "f16"):
        raise GGUFLoraError(f"adapter dtype must be 'f32' or 'f16', got {dtype!r}")
    np_dtype = np.float32 if dtype == "f32" else np.float16
    base = _Base.open(base_gguf)
    alpha, layers = lora_weights(peft_model)
    with _PrivateOutput(out) as tmp:
        writer = GGUFWriter(tmp, base.arch)
        writer.add_type("adapter")
        writer.add_string(KEY_ADAPTER_TYPE, "lora")
        writer.add_float32(KEY_ALPHA, alpha)
        for lw in layers:
            name = gguf_weight_name(lw.module, base.arch, base.n_blocks)
            b = to_gguf_rows(b_for_alpha(lw, alpha), name, base.arch, base.heads)
            writer.add_tensor(name + SUFFIX_A, np.ascontiguousarray(lw.a, dtype=np_dtype))
            writer.add_tensor(name + SUFFIX_B, np.ascontiguousarray(b, dtype=np_dtype))
        _write_all(writer)
        _check(tmp, base, base_gguf)
    return out


def _write_all(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def _target_qtype(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    # rows that do not fill whole blocks cannot be quantized; F16 like llama.cpp's converter
    return qtype if shape[-1] % block == 0 else GGMLQuantizationType.F16


def export_merged(
    peft_model: Any, base_gguf: Path, out: Path, *, dtype: MergedDtype = "f16"
) -> Path:
    """Write a full GGUF model: the base file with W + scaling * B @ A in the adapted tensors.

    Metadata (tokenizer included) and untouched tensors are copied byte for byte, keeping their
    quantization. Each adapted tensor is dequantized from `base_gguf` itself, so the merge is
    against exactly the weights the base serves, then stored as `dtype`.
    """
    if dtype not in _QTYPES:
        raise GGUFLoraError(f"merged dtype must be one of {sorted(_QTYPES)}, got {dtype!r}")
    base = _Base.open(base_gguf)
    _, layers = lora_weights(peft_model)
    shapes = base.tensor_shapes()
    by_name: dict[str, LoraWeights] = {}
    for lw in layers:
        name = gguf_weight_name(lw.module, base.arch, base.n_blocks)
        if name not in shapes:
            raise GGUFLoraError(f"{lw.module} maps to {name!r}, which the base file lacks")
        want = (lw.a.shape[1], lw.b.shape[0])  # ne order: (in, out)
        if shapes[name] != want:
            raise GGUFLoraError(f"{name}: base ne {shapes[name]} but LoRA gives {want}")
        by_name[name] = lw

    qtype = _QTYPES[dtype]
    plan: list[tuple[gguf.ReaderTensor, GGMLQuantizationType | None]] = []
    for t in base.reader.tensors:
        np_shape = tuple(int(n) for n in reversed(t.shape))
        plan.append((t, _target_qtype(np_shape, qtype) if t.name in by_name else None))
    matrix_types = [
        (new or t.tensor_type, int(t.n_elements)) for t, new in plan if len(t.shape) >= 2
    ]

    with _PrivateOutput(out) as tmp:
        writer = GGUFWriter(tmp, base.arch)
        alignment = _field(base.reader, KEY_ALIGNMENT)
        if alignment:
            writer.data_alignment = int(alignment)
        for name, field in base.reader.fields.items():
            if name.startswith("GGUF.") or name == KEY_ARCH:
                continue  # virtual fields; the writer adds the architecture itself
            value = field.contents()
            if name == KEY_FILE_TYPE:
                value = dominant_file_type(matrix_types, int(value))
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, field.types[0], sub_type=sub)
        if KEY_QUANT_VERSION not in base.reader.fields and qtype == GGMLQuantizationType.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        for t, new in plan:
            if new is None:
                writer.add_tensor_info(
                    t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type
                )
            else:
                np_shape = tuple(int(n) for n in reversed(t.shape))
                writer.add_tensor_info(t.name, *_encoded_info(np_shape, new), raw_dtype=new)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, new in plan:
            if new is None:
                writer.write_tensor_data(t.data, tensor_endianess=base.reader.endianess)
            else:
                writer.write_tensor_data(_merged_tensor(t, by_name[t.name], base, new))
        writer.close()
    return out


def _encoded_info(
    np_shape: tuple[int, ...], qtype: GGMLQuantizationType
) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dt = np.dtype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
        return np_shape, dt, int(np.prod(np_shape)) * dt.itemsize
    byte_shape = gguf.quants.quant_shape_to_byte_shape(np_shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _merged_tensor(
    t: gguf.ReaderTensor, lw: LoraWeights, base: _Base, qtype: GGMLQuantizationType
) -> np.ndarray:
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(lw.b.shape[0], lw.a.shape[1])
    w = w + to_gguf_rows(lw.delta(), t.name, base.arch, base.heads)
    return _encode(w, qtype)


# ---------------------------------------------------------------------------------------------
# The way back: a GGUF adapter into an in-memory HF model
# ---------------------------------------------------------------------------------------------


def read_adapter(adapter_path: Path) -> tuple[str, float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(arch, alpha, {base weight name: (A [r, in], B [out, r] in GGUF row order)})."""
    reader = GGUFReader(adapter_path)
    kv = _kv_types(reader)
    if (
        kv.get(KEY_TYPE, (None, None))[1] != "adapter"
        or kv.get(KEY_ADAPTER_TYPE, (None, None))[1] != "lora"
    ):
        raise GGUFLoraError(f"{adapter_path} is not a GGUF LoRA adapter")
    arch = str(kv[KEY_ARCH][1])
    alpha = float(kv.get(KEY_ALPHA, (None, 0.0))[1])
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape(tuple(int(n) for n in reversed(t.shape)))
        for suffix, key in ((SUFFIX_A, "a"), (SUFFIX_B, "b")):
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[key] = data
                break
        else:
            raise GGUFLoraError(f"{adapter_path}: unexpected tensor {t.name!r}")
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, p in parts.items():
        if set(p) != {"a", "b"}:
            raise GGUFLoraError(f"{adapter_path}: LoRA pair for {name!r} is incomplete")
        pairs[name] = (p["a"], p["b"])
    return arch, alpha, pairs


def _linears(model: Any, arch: str, n_blocks: int) -> Iterator[tuple[str, Any]]:
    import torch

    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or ".lora_" in name:
            continue
        try:
            yield gguf_weight_name(name, arch, n_blocks), mod
        except GGUFLoraError:
            continue


def apply_adapter_to_model(model: Any, adapter_path: Path, *, scale: float = 1.0) -> None:
    """Add scale * alpha / r * B @ A from a GGUF LoRA adapter into the HF Linears, in place."""
    import torch

    arch, alpha, pairs = read_adapter(adapter_path)
    cfg = model.config
    heads = Heads(
        int(cfg.num_attention_heads),
        int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
    )
    targets = dict(_linears(model, arch, int(cfg.num_hidden_layers)))
    missing = sorted(set(pairs) - set(targets))
    if missing:
        raise GGUFLoraError(f"{adapter_path}: no Linear in the model for {missing[:5]}")
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            weight = targets[name].weight
            b = from_gguf_rows(b, name, arch, heads)
            delta = (b @ a) * np.float32(adapter_scale(alpha, a.shape[0]) * scale)
            if tuple(weight.shape) != delta.shape:
                raise GGUFLoraError(f"{name}: model weight {tuple(weight.shape)} vs {delta.shape}")
            weight.add_(torch.from_numpy(delta).to(device=weight.device, dtype=weight.dtype))
