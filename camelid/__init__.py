"""camelid: run, chat with, serve, fine-tune and train LLaMA-family models.

    import camelid
    llm = camelid.load()                      # the default model, pulled on first use
    print(llm.chat("What is the capital of France?"))
"""

from .errors import (
    CamelidError,
    ContextLengthError,
    FormatError,
    ModelNotFoundError,
    SamplingError,
    StoreError,
    UnsupportedModelError,
)
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "load", "finetune", "export", "LLM", "SamplingParams", "CamelidError", "ContextLengthError", "FormatError",
    "ModelNotFoundError", "SamplingError", "StoreError", "UnsupportedModelError", "__version__",
]


def load(name_or_path=None, **kwargs):
    """Load a model by store name or path; see camelid.api.load."""
    from .api import load as _load

    return _load(name_or_path, **kwargs)


def finetune(model=None, data="", out="", **kwargs):
    """LoRA / QLoRA / full fine-tuning on your own data; see camelid.train.finetune.finetune."""
    from .train.finetune import finetune as _finetune

    return _finetune(model, data, out, **kwargs)


def export(model=None, adapter=None, to="gguf", out=None, **kwargs):
    """Write a model (with a LoRA adapter merged in) as GGUF or a Hugging Face folder, or the adapter alone as a
    GGUF LoRA file; see camelid.exporter.export."""
    from .exporter import export as _export

    return _export(model, adapter, to, out, **kwargs)


def __getattr__(name):  # keep `import camelid` fast: torch loads on first use
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(name)
