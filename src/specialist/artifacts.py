"""Load whatever a user points at as a model to answer with: a run folder, an export folder or a base model.

Evaluation arms, the export's replay and `serve` all load through here, so an artifact is scored exactly as it is
served. A `ModelPool` keeps one copy of each base model: runs that trained an adapter on it are attached to that
copy as named PEFT adapters, and each answer switches its arm's adapter on (the base arm: all of them off), so an
A/B of a base against three tuned adapters holds one base model in memory, not four.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.errors import ConfigError
from specialist.run_folder import ExportFolder, RunFolder

EXPORT_FORMATS = ("merged", "adapter", "gguf", "int8")


@dataclass
class Loaded:
    """A model ready to answer: the module, its tokenizer, the prompt format, and how to switch it on."""

    model: Any
    tokenizer: Any
    template: Any  # PromptTemplate, or None for a bare base model (the caller supplies a run's)
    context: Callable[[], AbstractContextManager] = nullcontext
    run: RunFolder | None = None
    weights_bytes: int | None = None
    kind: str = "base"  # "run", "export" or "base"
    engine: Any = None  # a ready engine callers use instead of building one (a classifier run's ClassifierEngine)
    retrieval: Any = None  # core.retrieval.RetrievalIndex of a data.retrieval run (its prompts carry neighbours)
    lone: Any = None  # a runtime for lone greedy requests (deploy.llamacpp.LoneGreedy on a GGUF export's file)

    def answering_engine(self, constraint=None, template=None):
        """The generation engine over this model: its prompt format (`template` for a bare base model), its
        adapter switch, its retrieval index; inside `constraint`'s language where one is given."""
        from specialist.generation import Engine

        engine = Engine(self.model, self.tokenizer, self.template or template, context=self.context,
                        constraint=constraint, retrieval=self.retrieval)
        engine.lone = self.lone
        return engine


def load_exported(folder: Path, pool: ModelPool | None = None) -> Loaded:
    """An export folder as it would be served: merged alone, an adapter onto its base model, GGUF through
    transformers' GGUF reader, int8 from its safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = ExportFolder(Path(folder))
    meta = export.meta()
    fmt = meta["format"]
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"{export.meta_file}: unknown export format {fmt!r}", hint=f"one of {EXPORT_FORMATS}")
    template, tokenizer = export.template(), AutoTokenizer.from_pretrained(export.path)
    found = Loaded(None, tokenizer, template, run=export.source_run(), weights_bytes=export.weights_bytes(),
                   kind="export", retrieval=export.retrieval())
    if fmt == "int8":
        from specialist.int8 import load_int8

        found.model = load_int8(export.path, export.file(meta.get("int8_file"))).eval()
    elif fmt == "gguf":
        from specialist.gguf_bounds import check_gguf_header

        gguf, lora = export.gguf_files()
        check_gguf_header(gguf)
        found.model = AutoModelForCausalLM.from_pretrained(export.path, gguf_file=gguf.name)
        found.model.hf_quantizer = None  # dequantized at load; the marks only block saving
        if lora is not None:  # base + LoRA adapter: the update added to the dequantized base
            from specialist.gguf_layout import merge_gguf_lora

            merge_gguf_lora(found.model, lora)
    elif fmt == "adapter":
        if not isinstance(meta.get("base_model"), str):
            raise ConfigError(f"{export.meta_file} names no base model", hint="export it again")
        pool = pool or ModelPool()
        found.model, found.context = pool.with_adapter(meta["base_model"], None, export.path, adapter_key(export.path))
        found.tokenizer = pool.tokenizer(meta["base_model"])  # an adapter export carries its base's tokenizer
    else:
        found.model = AutoModelForCausalLM.from_pretrained(export.path)
    found.model.eval()
    return found


LONE_RUNTIMES = ("auto", "torch", "llama.cpp")  # what answers a GGUF export arm's lone requests (deploy.arms)


def load_run(run: RunFolder, pool: ModelPool | None = None, adapter_name: str | None = None) -> Loaded:
    """A run folder's trained model: its adapter attached to the pooled base model, or its full model."""
    if run.is_classifier:  # a head, not a language model: its own engine (its own copy of the base)
        from specialist.classify import classifier_engine

        engine = classifier_engine(run, (pool or ModelPool()).dtype)
        return Loaded(engine.model, engine.tokenizer, engine.template, run=run, kind="run", engine=engine)
    pool = pool or ModelPool()
    config = run.config()
    found = Loaded(None, None, run.template(), run=run, kind="run", retrieval=run.retrieval())
    if run.has_adapter:
        found.model, found.context = pool.with_adapter(config.model.name, _start_of(config), run.adapter,
                                                       adapter_name or adapter_key(run.path))
        found.tokenizer = pool.tokenizer(config.model.name)
    else:
        base, found.tokenizer = pool.base(config.model.name, _start_of(config))
        found.model = run.load_model(base)
    return found


def load_base_model(name: str, pool: ModelPool | None = None, template=None) -> Loaded:
    """A base model by name or folder, answering in `template` (a run's), or its own default format."""
    from specialist.data import PromptTemplate

    pool = pool or ModelPool()
    model, tokenizer = pool.base(name)
    return Loaded(model, tokenizer, template or PromptTemplate.for_tokenizer(tokenizer),
                  context=pool.base_context(name), kind="base")


def load_source(source: str, pool: ModelPool | None = None, template=None) -> Loaded:
    """An export folder, a run folder, or else a base model name/folder (answering in `template`)."""
    path = Path(source)
    if ExportFolder.is_export(path):
        return load_exported(path, pool)
    if RunFolder.is_run(path):
        return load_run(RunFolder(path), pool)
    return load_base_model(source, pool, template)


def adapter_key(path: Path) -> str:
    """A PEFT adapter name for a folder (module names cannot hold dots or slashes)."""
    import hashlib

    return "a" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def _start_of(config) -> Path | None:
    """A DPO or GRPO run trained from an SFT adapter starts from the base with that adapter merged in."""
    return config.method.start_adapter


class ModelPool:
    """One loaded copy per base model (and per merged starting point); adapters attach to it by name."""

    def __init__(self, dtype: str = "float32", lone_runtime: str = "auto") -> None:
        if lone_runtime not in LONE_RUNTIMES:
            raise ConfigError(f"unknown runtime for lone requests {lone_runtime!r}", hint=f"one of {LONE_RUNTIMES}")
        self.dtype, self.lone_runtime = dtype, lone_runtime
        self._bases: dict[tuple[str, str | None], tuple[Any, Any]] = {}
        self._tokenizers: dict[str, Any] = {}

    def base(self, name: str, merged_adapter: Path | None = None):
        """(model, tokenizer) for base model `name` (with `merged_adapter` folded in), loaded once."""
        key = (name, str(merged_adapter) if merged_adapter else None)
        if key not in self._bases:
            from specialist.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(name, self.dtype)
            if merged_adapter is not None:
                from specialist.run_folder import merge_adapter

                model = merge_adapter(model, merged_adapter)
            self._bases[key] = (model, tokenizer)
            self._tokenizers.setdefault(name, tokenizer)
        return self._bases[key]

    def tokenizer(self, name: str):
        return self.base(name)[1]

    def with_adapter(self, name: str, merged_adapter: Path | None, adapter: Path, adapter_name: str):
        """The pooled base wrapped in PEFT with `adapter` attached as `adapter_name`; (model, context that
        switches that adapter on)."""
        from peft import PeftModel

        from specialist.generation import model_lock

        model, tokenizer = self.base(name, merged_adapter)
        # under the model's generation lock: a server swapping in a promoted adapter adds layers to weights that
        # another arm may be generating with; the load waits for that batch and the next one waits for the load
        with model_lock(model):
            if not isinstance(model, PeftModel):
                model = PeftModel.from_pretrained(model, adapter, adapter_name=adapter_name).eval()
                self._bases[(name, str(merged_adapter) if merged_adapter else None)] = (model, tokenizer)
            elif adapter_name not in model.peft_config:
                model.load_adapter(adapter, adapter_name=adapter_name)
        return model, adapter_switch(model, adapter_name)

    def base_context(self, name: str, merged_adapter: Path | None = None) -> Callable[[], AbstractContextManager]:
        """What an arm answering with the bare base needs: every adapter switched off, if any is attached."""
        # looked up at each use: a run attached later wraps the same weights in PEFT, whose adapters must go off
        return lambda: adapters_off(self.base(name, merged_adapter)[0])


@contextmanager
def adapters_off(model):
    """The base weights alone, whatever adapters are attached (a plain model is left as it is)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def adapter_switch(model, name: str) -> Callable[[], AbstractContextManager]:
    @contextmanager
    def active():
        model.set_adapter(name)
        yield

    return active
