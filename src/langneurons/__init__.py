"""langneurons: find, steer and fine-tune language-specific neurons in multilingual LLMs."""

__version__ = "0.1.0"
