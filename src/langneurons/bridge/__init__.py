"""BridgeX-ICL (Xu et al. 2025, arXiv 2508.17078): bridge languages for cross-lingual in-context learning.

The pipeline (``langneurons bridge probe|select|bli|mrc``; METHODS.md, section 6):

* :mod:`~langneurons.bridge.names` -- language names for prompts (endonyms by default, as [X25]);
* :mod:`~langneurons.bridge.probe` -- word-translation probes from MUSE dictionaries, kept when the
  model translates them correctly, and the mean activation over prompt tokens per probe
  (``[L, I, N]``, safetensors);
* :mod:`~langneurons.bridge.overlap` -- overlap neurons of two languages and bridge-language neurons
  from ``top-prob`` sets (the definitions are explicit parameters: the paper does not publish them);
* :mod:`~langneurons.bridge.hsic` -- biased, unbiased and normalised HSIC with Gaussian kernels and
  the median heuristic, and [X25]'s unnormalised ``tr(K_i H L_j)`` variant by name; vectorised,
  float64;
* :mod:`~langneurons.bridge.spectrum` -- language-by-language similarity matrices (overlap, cosine
  of activation probabilities, HSIC) and their plots;
* :mod:`~langneurons.bridge.select` -- per-layer bridge scores averaged over a middle-layer window
  of true layer ids, the ranking and its plot;
* :mod:`~langneurons.bridge.icl` -- bilingual lexicon induction through the chained prompt (exact
  match over unique source words) and MRC with the passage translated into the bridge language.
"""
