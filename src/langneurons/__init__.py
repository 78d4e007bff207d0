"""langneurons: find, steer and fine-tune language-specific neurons in multilingual LLMs.

The main objects are importable from the package root (loaded on first use):
``ActivationStats``, ``LanguageStats`` (langneurons.stats) and ``NeuronSet`` (langneurons.neuronset).
"""

__version__ = "0.1.0"

_LAZY = {"ActivationStats": "stats", "LanguageStats": "stats", "NeuronSet": "neuronset", "UserError": "errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'langneurons' has no attribute {name!r}")


__all__ = ["ActivationStats", "LanguageStats", "NeuronSet", "UserError", "__version__"]
