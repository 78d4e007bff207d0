"""Local lm-evaluation-harness tasks of langneurons (YAML + data files; pass this folder as ``include_path``).

``langneurons_mc``: a small multilingual multiple-choice task over ``langneurons_mc.jsonl``, loaded by
``utils.load_local`` without network access. See :mod:`langneurons.lmeval`.
"""
