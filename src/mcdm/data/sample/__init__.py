"""talkingface-wild-mini: the embedded sample dataset (``mcdm sample-data``, DVC stage ``sample_data``).

Real synthesised speech in ten languages (eSpeak NG), faces animated from the real portrait photos
that ship in scikit-image and matplotlib and from identities derived from them, mouth motion driven
by the speech, and planted defects listed with their ground truth in ``manifest.csv``.

Modules: ``speech`` (eSpeak NG via ctypes, sentences, envelope -> mouth opening), ``portraits``
(source photos and derived identities), ``animate`` (per-frame face rig), ``motion`` (per-video
ground-truth tracks), ``defects`` (what is planted and how), ``generator`` (plan, render, manifest:
``generate_sample``, ``read_manifest``, ``MANIFEST_COLUMNS``). Nothing is imported here, so the
speech subprocess stays light.
"""
