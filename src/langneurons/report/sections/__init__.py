"""The report's section renderers, one module per group of artifact kinds; the registry
(:mod:`langneurons.artifacts`) names each kind's renderer as ``MODULE.FUNCTION`` of this package."""
